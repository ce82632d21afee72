package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// measure is one line of the table: how a result gives the figure and, when the figure has a
// target, the most a bot may have relative to the baseline.
type measure struct {
	name     string
	unit     string
	get      func(*result) (float64, bool)
	maxRatio float64 // the target: bot/baseline at most this; 0 means none
	target   string
	// base, when set, is the baseline's figure the target compares with instead of get's.
	base func(*result) (float64, bool)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func readyMS(r *result) (float64, bool)    { return ms(r.ready.at), r.ready.measured }
func readyCPUMS(r *result) (float64, bool) { return ms(r.ready.cpu), r.ready.measured }

var measures = []measure{
	{name: "time to ready", unit: "ms", maxRatio: 0.1, target: "≤ 1/10", get: readyMS},
	{name: "CPU to ready", unit: "ms", maxRatio: 0.1, target: "≤ 1/10", get: readyCPUMS},
	{name: "bytes to ready (both directions)", unit: "KB", maxRatio: 0.05, target: "≤ 1/20", get: func(r *result) (float64, bool) {
		return float64(r.ready.in+r.ready.out) / 1000, r.ready.measured
	}},
	{name: "  of which sent by the bot", unit: "KB", get: func(r *result) (float64, bool) { return float64(r.ready.in) / 1000, r.ready.measured }},
	{name: "peak RSS (whole run)", unit: "MB", maxRatio: 0.25, target: "≤ 1/4", get: func(r *result) (float64, bool) {
		return float64(r.peakRSSKB) / 1024, r.peakRSSKB > 0
	}},
	{name: "RSS high-water at ready", unit: "MB", get: func(r *result) (float64, bool) { return float64(r.ready.rssKB) / 1024, r.ready.rssKB > 0 }},
	{name: "every room known", unit: "ms", maxRatio: 1, target: "≤ baseline's ready", base: readyMS, get: func(r *result) (float64, bool) {
		return ms(r.allKnown.at), r.allKnown.measured
	}},
	{name: "CPU until every room known", unit: "ms", maxRatio: 0.33, target: "≤ 1/3 of baseline's CPU to ready", base: readyCPUMS, get: func(r *result) (float64, bool) {
		return ms(r.allKnown.cpu), r.allKnown.measured
	}},
	{name: "bytes until every room known", unit: "KB", get: func(r *result) (float64, bool) {
		return float64(r.allKnown.in+r.allKnown.out) / 1000, r.allKnown.measured
	}},
	{name: "idle cycle: CPU", unit: "ms", maxRatio: 1, target: "≤ 1", get: func(r *result) (float64, bool) { return ms(r.idleCPU), r.idleCycles > 0 }},
	{name: "idle cycle: bytes (both directions)", unit: "B", maxRatio: 1, target: "≤ 1", get: func(r *result) (float64, bool) {
		return r.idleIn + r.idleOut, r.idleCycles > 0
	}},
	{name: "  of which sent by the bot", unit: "B", get: func(r *result) (float64, bool) { return r.idleIn, r.idleCycles > 0 }},
	{name: "device-list change → key query", unit: "ms", get: func(r *result) (float64, bool) { return ms(r.deviceListLatency), r.deviceListLatency > 0 }},
	{name: "peer message → encrypted echo sent", unit: "ms", get: func(r *result) (float64, bool) { return ms(r.echoLatency), r.echoLatency > 0 }},
	{name: "total CPU of the run", unit: "ms", get: func(r *result) (float64, bool) { return ms(r.totalCPU), r.totalCPU > 0 }},
}

// stat is one figure of one bot over its runs.
type stat struct {
	med, lo, hi float64
	n           int
}

func summarize(rs []*result, get func(*result) (float64, bool)) (stat, bool) {
	var vals []float64
	for _, r := range rs {
		if r == nil {
			continue
		}
		if v, ok := get(r); ok {
			vals = append(vals, v)
		}
	}
	if len(vals) == 0 {
		return stat{}, false
	}
	slices.Sort(vals)
	med := vals[len(vals)/2]
	if len(vals)%2 == 0 {
		med = (vals[len(vals)/2-1] + vals[len(vals)/2]) / 2
	}
	return stat{med: med, lo: vals[0], hi: vals[len(vals)-1], n: len(vals)}, true
}

// ratio is bot's median over the baseline's, and whether it meets m's target.
func (m measure) ratio(base, bot []*result) (q float64, met string, ok bool) {
	get := m.get
	if m.base != nil {
		get = m.base
	}
	b, okB := summarize(base, get)
	s, okS := summarize(bot, m.get)
	if !okB || !okS || b.med == 0 {
		return 0, "", false
	}
	q = s.med / b.med
	if m.maxRatio > 0 {
		met = map[bool]string{true: "yes", false: "**no**"}[q <= m.maxRatio]
	}
	return q, met, true
}

// printTable prints one column per bot (median, and the range over several runs), then the
// ratio of every other bot to the first with the target and whether it is met.
func printTable(w io.Writer, names []string, results [][]*result) {
	head := []string{"measure"}
	head = append(head, names...)
	for _, n := range names[1:] {
		head = append(head, n+" / "+names[0])
	}
	head = append(head, "target", "met")
	fmt.Fprintf(w, "| %s |\n", strings.Join(head, " | "))
	fmt.Fprintf(w, "|---|%s---|---|\n", strings.Repeat("---:|", len(names)+len(names)-1))
	for _, m := range measures {
		cells := []string{m.name}
		for _, rs := range results {
			cells = append(cells, cell(rs, m))
		}
		var mets []string
		for _, rs := range results[1:] {
			q, met, ok := m.ratio(results[0], rs)
			if !ok {
				cells = append(cells, "—")
				continue
			}
			cells = append(cells, fmt.Sprintf("%.3g", q))
			if met != "" {
				mets = append(mets, met)
			}
		}
		cells = append(cells, m.target, strings.Join(mets, ", "))
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
	fmt.Fprintln(w)
	for i, rs := range results {
		for run, r := range rs {
			fmt.Fprintf(w, "%s, run %d: %d sync requests, %d responses, %d idle cycles of %s each, %s received / %s sent by the server in total\n",
				names[i], run+1, r.syncRequests, r.responses, r.idleCycles, r.idleWall.Round(time.Millisecond),
				strings.TrimSpace(num(float64(r.totalIn)/1000))+" KB", strings.TrimSpace(num(float64(r.totalOut)/1000))+" KB")
		}
	}
}

// cell is a bot's median of m with its unit, and the range when there were several runs.
func cell(rs []*result, m measure) string {
	s, ok := summarize(rs, m.get)
	if !ok {
		return "—"
	}
	out := num(s.med) + " " + m.unit
	if s.n > 1 {
		out += fmt.Sprintf(" (%s–%s)", num(s.lo), num(s.hi))
	}
	return out
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
