package main

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// table writes aligned columns and keeps the first write error, so that a listing of
// many lines is checked once, at flush, where a closed pipe or a full disk shows.
type table struct {
	tw  *tabwriter.Writer
	err error
}

func newTable(w io.Writer) *table {
	return &table{tw: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
}

// printf writes one piece of the table; after a failed write it writes nothing more.
func (t *table) printf(format string, args ...any) {
	if t.err == nil {
		_, t.err = fmt.Fprintf(t.tw, format, args...)
	}
}

// flush writes out what is buffered and returns the first error.
func (t *table) flush() error {
	if t.err != nil {
		return t.err
	}
	return t.tw.Flush()
}
