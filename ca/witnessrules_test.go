package ca

import (
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

// alertRulesFile holds the Prometheus alerting rules shipped in deploy/; witnessRules
// names its group of the witness's rules.
const (
	alertRulesFile = "../deploy/prometheus/alerts.yaml"
	witnessRules   = "agentmesh-audit-witness"
)

// checkAlertRules checks the alerting rules in deploy/ as Prometheus loads them
// (rulefmt: the file's format, every expression and template) and the witness's rules
// against what the CA exports (g, after the CA did what each series needs): every rule
// has a severity and a summary, and every selector of a CA metric matches a series the
// CA exports. The other groups' metrics need a running mesh: e2e/dashboards_test.go
// checks every rule against one.
func checkAlertRules(t *testing.T, g prometheus.Gatherer) {
	t.Helper()
	p := parser.NewParser(parser.Options{})
	groups, errs := rulefmt.ParseFile(alertRulesFile, false, model.UTF8Validation, p, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Error(err)
	}
	if groups == nil {
		t.FailNow()
	}
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var series []labels.Labels
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			b := labels.NewScratchBuilder(len(m.GetLabel()) + 1)
			b.Add(model.MetricNameLabel, mf.GetName())
			for _, lp := range m.GetLabel() {
				b.Add(lp.GetName(), lp.GetValue())
			}
			b.Sort()
			series = append(series, b.Labels())
		}
	}
	rules := 0
	for _, grp := range groups.Groups {
		if grp.Name != witnessRules {
			continue
		}
		for _, r := range grp.Rules {
			rules++
			if r.Alert == "" || !slices.Contains([]string{"critical", "warning"}, r.Labels["severity"]) || r.Annotations["summary"] == "" {
				t.Errorf("%s: rule %q lacks an alert name, a severity or a summary", alertRulesFile, r.Alert)
			}
			expr, err := p.ParseExpr(r.Expr)
			if err != nil {
				t.Fatalf("%s: rule %s: %v", alertRulesFile, r.Alert, err) // rulefmt parsed it already
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				vs, ok := n.(*parser.VectorSelector)
				if !ok || !isCAMetric(vs.Name) {
					return nil // the other binaries' metrics are checked by their own tests
				}
				if !slices.ContainsFunc(series, func(s labels.Labels) bool { return matchesAll(s, vs.LabelMatchers) }) {
					t.Errorf("%s: rule %s selects %s, which the CA does not export", alertRulesFile, r.Alert, vs)
				}
				return nil
			})
		}
	}
	if rules == 0 {
		t.Errorf("%s holds no rule", alertRulesFile)
	}
}

func isCAMetric(name string) bool { return strings.HasPrefix(name, "agentmesh_ca_") }

// matchesAll reports whether the series s satisfies every matcher.
func matchesAll(s labels.Labels, ms []*labels.Matcher) bool {
	for _, m := range ms {
		if !m.Matches(s.Get(m.Name)) {
			return false
		}
	}
	return true
}
