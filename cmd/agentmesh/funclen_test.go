package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// maxFuncLines is the longest a function in cmd may be, from its func keyword to its
// closing brace: cmd parses flags, builds a config and calls one function, and logic
// that needs more belongs to the package that owns it.
const maxFuncLines = 60

// funcLengths returns the length in lines of every function and method declared in
// the non-test Go files of dir, keyed by "file.go:name" (methods by their name alone, the
// longest when several share it).
func funcLengths(t *testing.T, dir string) map[string]int {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	out := map[string]int{}
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok {
				n := fset.Position(fd.End()).Line - fset.Position(fd.Pos()).Line + 1
				// Methods of two types may share a name in one file: keep the longest.
				key := filepath.Base(path) + ":" + fd.Name.Name
				out[key] = max(out[key], n)
			}
		}
	}
	return out
}

func TestFunctionLength(t *testing.T) {
	t.Parallel()
	lengths := funcLengths(t, ".")
	if len(lengths) == 0 {
		t.Fatal("no functions found: the test reads the wrong directory")
	}
	for name, n := range lengths {
		if n > maxFuncLines {
			t.Errorf("%s is %d lines, over the %d of cmd: move its logic to the package that owns it", name, n, maxFuncLines)
		}
	}
}

// funcLengths counts a declaration from its func keyword to its closing brace, closures
// included, so a limit cannot be dodged by nesting a long RunE literal.
func TestFuncLengthsCounts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src := "package p\n\nfunc short() {}\n\nfunc long() {\n\tf := func() {\n\t\t_ = 1\n\t}\n\tf()\n}\n\ntype T struct{}\n\nfunc (T) m() {\n}\n\ntype U struct{}\n\nfunc (U) m() {\n\t_ = 1\n\t_ = 2\n}\n"
	for name, text := range map[string]string{"p.go": src, "p_test.go": "package p\n\nfunc ignored() {\n}\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	got := funcLengths(t, dir)
	want := map[string]int{"p.go:short": 1, "p.go:long": 6, "p.go:m": 4}
	if len(got) != len(want) {
		t.Fatalf("funcLengths = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %d lines, want %d (all: %v)", k, got[k], v, got)
		}
	}
}
