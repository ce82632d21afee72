package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDemoCompletes(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	require.NoError(t, runDemo(ctx, options{protocol: "auto", demoRooms: 1234}))
}

func TestDemoFailsWhenInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.Error(t, runDemo(ctx, options{protocol: "auto", demoRooms: 10}))
}
