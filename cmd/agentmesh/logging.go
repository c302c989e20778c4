package main

import (
	"fmt"
	"io"
	"log"
	"log/slog"
	"strings"
)

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if s == "" {
		return slog.LevelInfo, nil
	}
	if err := l.UnmarshalText([]byte(strings.ToUpper(s))); err != nil {
		return 0, fmt.Errorf("unknown level %q (debug, info, warn, error)", s)
	}
	return l, nil
}

// newLogger builds the process logger and routes the standard library's global logger,
// which embedded step-ca writes to, into it at Debug.
func newLogger(w io.Writer, level slog.Level, format string) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(w, opts)
	if format == "json" {
		h = slog.NewJSONHandler(w, opts)
	}
	logger := slog.New(h)
	std := slog.NewLogLogger(h.WithAttrs([]slog.Attr{slog.String("component", "stepca")}), slog.LevelDebug)
	log.SetFlags(0)
	log.SetOutput(std.Writer())
	return logger
}
