package audit_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// TestNoEventUsesAHeaderKey reads every non-test Go file of the module and checks each
// struct type that has a Kind method (an audit event, whatever package declares it):
// none of its JSON keys, its embedded structs' included, may be a record header key,
// which Append would refuse at run time, losing the record.
func TestNoEventUsesAHeaderKey(t *testing.T) {
	t.Parallel()
	fset := token.NewFileSet()
	type pkgType struct{ dir, name string }
	structs := map[pkgType]*ast.StructType{}
	var events []pkgType
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || d.Name() == "bench" || strings.HasPrefix(d.Name(), ".")) && path != ".." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		dir := filepath.Dir(path)
		for _, decl := range f.Decls {
			switch d := decl.(type) {
			case *ast.GenDecl:
				for _, s := range d.Specs {
					if ts, ok := s.(*ast.TypeSpec); ok {
						if st, ok := ts.Type.(*ast.StructType); ok {
							structs[pkgType{dir, ts.Name.Name}] = st
						}
					}
				}
			case *ast.FuncDecl:
				if d.Recv != nil && d.Name.Name == "Kind" && len(d.Recv.List) == 1 {
					if id := receiverName(d.Recv.List[0].Type); id != "" {
						events = append(events, pkgType{dir, id})
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var keys func(pt pkgType) []string
	keys = func(pt pkgType) []string {
		st := structs[pt]
		if st == nil {
			return nil
		}
		var out []string
		for _, f := range st.Fields.List {
			tag := ""
			if f.Tag != nil {
				tag, _ = strconv.Unquote(f.Tag.Value)
			}
			name, _, _ := strings.Cut(reflect.StructTag(tag).Get("json"), ",")
			if name == "-" {
				continue
			}
			if len(f.Names) == 0 && name == "" { // embedded: its fields are flattened
				if id := receiverName(f.Type); id != "" {
					out = append(out, keys(pkgType{pt.dir, id})...)
				}
				continue
			}
			for _, n := range f.Names {
				if name == "" {
					name = n.Name
				}
				if n.IsExported() {
					out = append(out, name)
				}
			}
		}
		return out
	}
	checked := 0
	for _, ev := range events {
		if structs[ev] == nil {
			continue // not a struct: encodes as it likes, and Append checks it
		}
		checked++
		for _, k := range keys(ev) {
			switch strings.ToLower(k) {
			case "seq", "time", "type", "prev", "hash":
				t.Errorf("%s.%s has the record header key %q", ev.dir, ev.name, k)
			}
		}
	}
	if checked < 10 {
		t.Fatalf("found only %d event types: the walk is broken", checked)
	}
}

// receiverName is the type name of a receiver or embedded field: T, *T, pkg.T is skipped.
func receiverName(e ast.Expr) string {
	if s, ok := e.(*ast.StarExpr); ok {
		e = s.X
	}
	if id, ok := e.(*ast.Ident); ok {
		return id.Name
	}
	return ""
}
