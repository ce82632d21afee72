// Package testlog keeps what tests log: a buffer that a logger's goroutines write while the
// test reads it, and a context whose zerolog logger writes to one that the test shows when it
// fails.
package testlog

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
)

// Buffer is a bytes.Buffer safe for concurrent writes and reads. The zero value is empty.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Count returns how many times s occurs in what was written.
func (b *Buffer) Count(s string) int { return strings.Count(b.String(), s) }

// Context returns the test's context with a debug-level zerolog logger writing to the
// returned buffer, which the test logs if it fails.
func Context(t testing.TB) (context.Context, *Buffer) {
	t.Helper()
	logs := &Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", logs.String())
		}
	})
	log := zerolog.New(logs).Level(zerolog.DebugLevel).With().Timestamp().Logger()
	return log.WithContext(t.Context()), logs
}
