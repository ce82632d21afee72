package proxytest

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel kill the proxy if the test process dies without cleanup.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
