// Package cachedbin finds the server binaries that the integration harnesses run (Dendrite,
// the MSC3575 proxy): the one an environment variable names, else one cached in the user
// cache directory (<cache>/sliding-e2ee/<name>-<version>), else one it builds there. [Start]
// runs one for a test until it answers, [Proc.Stop] and [Proc.Kill] end it.
package cachedbin

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Spec says where a binary comes from.
type Spec struct {
	Name    string                 // the binary's name, e.g. "dendrite"
	Version string                 // its version, part of the cached file's name
	EnvBin  string                 // the environment variable that may name a binary
	Build   func(dst string) error // builds the binary into dst, replacing it atomically
}

// Path is where the binary of spec is cached.
func Path(spec Spec) (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "sliding-e2ee", spec.Name+"-"+spec.Version), nil
}

// Find returns the path of the binary: the one named by spec.EnvBin, else the cached one,
// else one spec.Build builds into the cache.
func Find(spec Spec) (string, error) {
	if p := os.Getenv(spec.EnvBin); p != "" {
		if err := CheckExecutable(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", spec.EnvBin, p, err)
		}
		return p, nil
	}
	cached, err := Path(spec)
	if err != nil {
		return "", fmt.Errorf("no cache directory for the %s binary: %w", spec.Name, err)
	}
	if CheckExecutable(cached) == nil {
		return cached, nil
	}
	fmt.Fprintf(os.Stderr, "building %s %s into %s (once; a few minutes when cold)\n", spec.Name, spec.Version, cached)
	if err = spec.Build(cached); err != nil {
		return "", err
	}
	return cached, nil
}

// CheckExecutable reports why p is not an executable file, or nil.
func CheckExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return errors.New("not an executable file")
	}
	return nil
}

// Tail returns the last n bytes of b, trimmed, for error messages carrying build output.
func Tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}
