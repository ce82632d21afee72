package cachedbin

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// stopTimeout is how long a process gets to exit after each signal.
const stopTimeout = 10 * time.Second

// Proc is a server binary running for a test.
type Proc struct {
	Cmd     *exec.Cmd
	LogPath string // its standard output and error
	exited  chan struct{}
}

// Start starts cmd with its output in a new file logPath, killed with the test process where
// the system allows it (Linux), and waits until GET readyURL answers 200, for at most
// timeout; a process that does not is killed. name says what runs, in errors.
func Start(name string, cmd *exec.Cmd, logPath, readyURL string, timeout time.Duration) (*Proc, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	setDeathSignal(cmd)
	if err = cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	p := &Proc{Cmd: cmd, LogPath: logPath, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: 2 * time.Second}
	for time.Now().Before(deadline) {
		select {
		case <-p.exited:
			return nil, fmt.Errorf("%s exited during startup: %s\n%s", name, cmd.ProcessState, p.Log())
		default:
		}
		if resp, err := client.Get(readyURL); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	err = fmt.Errorf("%s did not answer %s within %s\n%s", name, readyURL, timeout, p.Log())
	return nil, errors.Join(err, p.Kill())
}

// Log returns the tail of the process's log.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return Tail(b, 8000)
}

// signal sends sig unless the process has exited, and reports whether it has exited within
// stopTimeout.
func (p *Proc) signal(sig os.Signal) bool {
	select {
	case <-p.exited:
		return true
	default:
	}
	_ = p.Cmd.Process.Signal(sig)
	select {
	case <-p.exited:
		return true
	case <-time.After(stopTimeout):
		return false
	}
}

// Kill kills the process with SIGKILL, as a crash would, and waits until it has exited.
func (p *Proc) Kill() error {
	if p.signal(syscall.SIGKILL) {
		return nil
	}
	return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.Cmd.Path, p.Cmd.Process.Pid)
}

// Stop asks the process to stop (SIGTERM), kills it if it has not within 10 s, and waits
// until it has exited.
func (p *Proc) Stop() error {
	if p.signal(syscall.SIGTERM) {
		return nil
	}
	return p.Kill()
}

// Skip skips the test with "prefix: why", or fails it when the environment variable
// envRequire is 1.
func Skip(t testing.TB, prefix, envRequire, why string) {
	t.Helper()
	msg := prefix + ": " + why
	if os.Getenv(envRequire) == "1" {
		t.Fatal(msg + " (and " + envRequire + "=1)")
	}
	fmt.Fprintln(os.Stderr, "!!! "+msg)
	t.Skip(msg)
}

// RandomHex returns n random bytes in hex.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
