package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// row is one line of the table: both figures, and the target on SDK/v2 if there is one.
type row struct {
	name     string
	v2, sdk  float64
	unit     string
	haveV2   bool
	haveSDK  bool
	maxRatio float64 // the target: SDK/v2 at most this; 0 means none
	target   string
}

func (r row) ratio() (float64, bool) {
	if !r.haveV2 || !r.haveSDK || r.v2 == 0 {
		return 0, false
	}
	return r.sdk / r.v2, true
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// rows turns two results into table rows. A nil result or an unmeasured figure is left empty.
func rows(v2, sdk *result) []row {
	get := func(r *result, f func(*result) (float64, bool)) (float64, bool) {
		if r == nil {
			return 0, false
		}
		return f(r)
	}
	mk := func(name, unit string, maxRatio float64, target string, f func(*result) (float64, bool)) row {
		a, okA := get(v2, f)
		b, okB := get(sdk, f)
		return row{name: name, unit: unit, v2: a, sdk: b, haveV2: okA, haveSDK: okB, maxRatio: maxRatio, target: target}
	}
	out := []row{
		mk("time to ready", "ms", 0.1, "≤ 1/10", func(r *result) (float64, bool) { return ms(r.ready.at), r.ready.measured }),
		mk("CPU to ready", "ms", 0.1, "≤ 1/10", func(r *result) (float64, bool) { return ms(r.ready.cpu), r.ready.measured }),
		mk("bytes to ready (both directions)", "KB", 0.05, "≤ 1/20", func(r *result) (float64, bool) {
			return float64(r.ready.in+r.ready.out) / 1000, r.ready.measured
		}),
		mk("  of which sent by the bot", "KB", 0, "", func(r *result) (float64, bool) { return float64(r.ready.in) / 1000, r.ready.measured }),
		mk("peak RSS (whole run)", "MB", 0.25, "≤ 1/4", func(r *result) (float64, bool) { return float64(r.peakRSSKB) / 1024, r.peakRSSKB > 0 }),
		mk("RSS high-water at ready", "MB", 0, "", func(r *result) (float64, bool) { return float64(r.ready.rssKB) / 1024, r.ready.rssKB > 0 }),
		mk("every room known", "ms", 0, "SDK ≤ v2 ready", func(r *result) (float64, bool) { return ms(r.allKnown.at), r.allKnown.measured }),
		mk("CPU until every room known", "ms", 0, "", func(r *result) (float64, bool) { return ms(r.allKnown.cpu), r.allKnown.measured }),
		mk("bytes until every room known", "KB", 0, "", func(r *result) (float64, bool) {
			return float64(r.allKnown.in+r.allKnown.out) / 1000, r.allKnown.measured
		}),
		mk("idle cycle: CPU", "ms", 1, "≤ 1", func(r *result) (float64, bool) { return ms(r.idleCPU), r.idleCycles > 0 }),
		mk("idle cycle: bytes (both directions)", "B", 1, "≤ 1", func(r *result) (float64, bool) { return r.idleIn + r.idleOut, r.idleCycles > 0 }),
		mk("  of which sent by the bot", "B", 0, "", func(r *result) (float64, bool) { return r.idleIn, r.idleCycles > 0 }),
		mk("device-list change → key query", "ms", 0, "", func(r *result) (float64, bool) { return ms(r.deviceListLatency), r.deviceListLatency > 0 }),
		mk("peer message → encrypted echo sent", "ms", 0, "", func(r *result) (float64, bool) { return ms(r.echoLatency), r.echoLatency > 0 }),
		mk("total CPU of the run", "ms", 0, "", func(r *result) (float64, bool) { return ms(r.totalCPU), r.totalCPU > 0 }),
	}
	// "Every room known" is judged against v2's time to ready.
	if v2 != nil && v2.ready.measured {
		out[6].v2, out[6].haveV2, out[6].maxRatio = ms(v2.ready.at), true, 1
	}
	return out
}

func printTable(w io.Writer, v2, sdk *result) {
	fmt.Fprintln(w, "| measure | v2 /sync | SDK | SDK / v2 | target | met |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---|---|")
	for _, r := range rows(v2, sdk) {
		cell := func(v float64, ok bool) string {
			if !ok {
				return "—"
			}
			return fmt.Sprintf("%s %s", num(v), r.unit)
		}
		ratio, met := "—", ""
		if q, ok := r.ratio(); ok {
			ratio = fmt.Sprintf("%.3g", q)
			if r.maxRatio > 0 {
				met = map[bool]string{true: "yes", false: "**no**"}[q <= r.maxRatio]
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", r.name, cell(r.v2, r.haveV2), cell(r.sdk, r.haveSDK), ratio, r.target, met)
	}
	for _, r := range []*result{v2, sdk} {
		if r != nil {
			fmt.Fprintf(w, "\n%s: %d sync requests, %d responses, %d idle cycles of %s each, %s received / %s sent by the server in total",
				r.name, r.syncRequests, r.responses, r.idleCycles, r.idleWall.Round(time.Millisecond),
				strings.TrimSpace(num(float64(r.totalIn)/1000))+" KB", strings.TrimSpace(num(float64(r.totalOut)/1000))+" KB")
		}
	}
	fmt.Fprintln(w)
}

func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}
