package redirect

import (
	"bufio"
	"bytes"
	"fmt"
	"slices"
	"strings"
)

// tableState is the nat table as iptables-save printed it.
type tableState struct {
	chains map[string]bool // every chain declared, built-in or not
	rules  []Rule          // every rule, in iptables-save order
}

// maxSaveLine bounds one line of iptables-save output; real rules are far shorter.
const maxSaveLine = 1 << 20

// parseSave reads the nat table out of iptables-save output (other tables are skipped).
// A line it does not understand is an error rather than something to guess about, since
// Install and Remove decide what to delete from this.
func parseSave(out []byte) (tableState, error) {
	st := tableState{chains: map[string]bool{}}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, maxSaveLine)
	table := ""
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			if table != "" {
				return tableState{}, fmt.Errorf("line %d: table %q starts before COMMIT of %q", n, line[1:], table)
			}
			table = line[1:]
		case table == "":
			return tableState{}, fmt.Errorf("line %d: %q outside a table", n, truncate(line))
		case line == "COMMIT":
			table = ""
		case table != "nat":
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if name == "" {
				return tableState{}, fmt.Errorf("line %d: chain declaration without a name", n)
			}
			st.chains[name] = true
		case strings.HasPrefix(line, "-A "):
			chain, spec, _ := strings.Cut(strings.TrimSpace(line[3:]), " ")
			if !st.chains[chain] {
				return tableState{}, fmt.Errorf("line %d: rule in undeclared chain %q", n, truncate(chain))
			}
			st.rules = append(st.rules, Rule{Chain: chain, Spec: strings.TrimSpace(spec)})
		default:
			return tableState{}, fmt.Errorf("line %d: unexpected %q", n, truncate(line))
		}
	}
	if err := sc.Err(); err != nil {
		return tableState{}, err
	}
	if table != "" {
		return tableState{}, fmt.Errorf("table %q has no COMMIT (truncated output?)", table)
	}
	return st, nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

func isOwn(chain string) bool { return slices.Contains(ownChains[:], chain) }

// target returns the chain or target a rule specification jumps or goes to, "" for none.
func target(spec string) string {
	args := splitArgs(spec)
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-j", "--jump", "-g", "--goto":
			return args[i+1]
		}
	}
	return ""
}

// splitArgs splits a rule specification into arguments the way iptables-restore does:
// on spaces, except inside double quotes, with \" and \\ escaped inside quotes. It matters
// for a comment such as --comment "-j AGENTMESH_OUTPUT", which is not a jump.
func splitArgs(spec string) []string {
	var (
		args    []string
		cur     strings.Builder
		inQuote bool
		have    bool
	)
	for i := 0; i < len(spec); i++ {
		c := spec[i]
		switch {
		case inQuote && c == '\\' && i+1 < len(spec) && (spec[i+1] == '"' || spec[i+1] == '\\'):
			i++
			cur.WriteByte(spec[i])
		case c == '"':
			inQuote = !inQuote
			have = true
		case !inQuote && (c == ' ' || c == '\t'):
			if have {
				args = append(args, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteByte(c)
			have = true
		}
	}
	if have {
		args = append(args, cur.String())
	}
	return args
}

// restoreScript returns the iptables-restore --noflush input that turns the nat table cur
// into one holding exactly want of agentmesh's (nothing, for an empty want), or "" when it
// already does. The whole change is one restore, so the kernel switches from the old rules
// to the new ones atomically: there is no moment without capture during a reinstall.
func restoreScript(cur tableState, want Ruleset) string {
	wanted := map[string][]string{}
	for _, c := range want.Chains {
		wanted[c.Name] = c.Rules
	}
	have := map[string][]string{}
	for _, r := range cur.rules {
		if isOwn(r.Chain) {
			have[r.Chain] = append(have[r.Chain], r.Spec)
		}
	}
	upToDate := true
	var stale []string
	for _, name := range ownChains {
		w, ok := wanted[name]
		switch {
		case !ok && cur.chains[name]:
			stale = append(stale, name)
			upToDate = false
		case ok && (!cur.chains[name] || !slices.Equal(w, have[name])):
			upToDate = false
		}
	}

	// Keep one copy of each wanted jump already there; every other rule that enters one
	// of our chains (a duplicate, an older form, a jump into a stale chain) goes.
	missing := slices.Clone(want.Jumps)
	var del []Rule
	for _, r := range cur.rules {
		if isOwn(r.Chain) || !isOwn(target(r.Spec)) {
			continue
		}
		if i := slices.Index(missing, r); i >= 0 {
			missing = slices.Delete(missing, i, i+1)
			continue
		}
		del = append(del, r)
	}
	if upToDate && len(del) == 0 && len(missing) == 0 {
		return ""
	}

	// Order matters inside the restore: chains exist before jumps into them are added,
	// and a chain is empty and unreferenced before it is deleted. Declaring an existing
	// chain under --noflush flushes it, which is how a reinstall replaces its rules.
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, c := range want.Chains {
		b.WriteString(":" + c.Name + " - [0:0]\n")
	}
	for _, c := range want.Chains {
		for _, spec := range c.Rules {
			b.WriteString("-A " + c.Name + " " + spec + "\n")
		}
	}
	for _, r := range del {
		b.WriteString("-D " + r.Chain + " " + r.Spec + "\n")
	}
	for _, r := range missing {
		b.WriteString(r.String() + "\n")
	}
	for _, name := range stale {
		b.WriteString("-F " + name + "\n")
	}
	for _, name := range stale {
		b.WriteString("-X " + name + "\n")
	}
	b.WriteString("COMMIT\n")
	return b.String()
}
