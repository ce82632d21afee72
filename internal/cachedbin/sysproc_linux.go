package cachedbin

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel kill a server if the test process dies without cleanup.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
