package ca

import (
	"bytes"
	"os"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v3"
)

// alertRulesFile holds the Prometheus alerting rules shipped in deploy/.
const alertRulesFile = "../deploy/prometheus/alerts.yaml"

// ruleFile is the part of Prometheus's rule file format the rules use.
type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

var (
	// selectorRE finds the CA's metric selectors in a PromQL expression; the other
	// binaries' are checked by their own tests.
	selectorRE = regexp.MustCompile(`(agentmesh_ca_[a-z0-9_]+)(\{([^}]*)\})?`)
	matcherRE  = regexp.MustCompile(`([a-z_]+)="([^"]*)"`)
)

// checkAlertRules checks the alerting rules in deploy/ against what the CA exports
// (g, after the CA did what each series needs): every rule is complete, and every
// selector of a CA metric names a metric the CA exports, with label values of series
// it exports.
func checkAlertRules(t *testing.T, g prometheus.Gatherer) {
	t.Helper()
	b, err := os.ReadFile(alertRulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var f ruleFile
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("%s: %v", alertRulesFile, err)
	}
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[string][]map[string]string{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			series[mf.GetName()] = append(series[mf.GetName()], labels)
		}
	}
	rules := 0
	for _, grp := range f.Groups {
		for _, r := range grp.Rules {
			rules++
			if r.Alert == "" || r.Expr == "" || !slices.Contains([]string{"critical", "warning"}, r.Labels["severity"]) ||
				r.Annotations["summary"] == "" {
				t.Errorf("%s: rule %q lacks an alert name, expr, severity or summary", alertRulesFile, r.Alert)
			}
			if _, err := time.ParseDuration(r.For); r.For != "" && err != nil {
				t.Errorf("%s: rule %s: for %q: %v", alertRulesFile, r.Alert, r.For, err)
			}
			for _, sel := range selectorRE.FindAllStringSubmatch(r.Expr, -1) {
				if !exported(series[sel[1]], matcherRE.FindAllStringSubmatch(sel[3], -1)) {
					t.Errorf("%s: rule %s selects %s, which the CA does not export", alertRulesFile, r.Alert, sel[0])
				}
			}
		}
	}
	if rules == 0 {
		t.Errorf("%s holds no rule", alertRulesFile)
	}
}

// exported reports whether some series has every label value of matchers.
func exported(series []map[string]string, matchers [][]string) bool {
	return slices.ContainsFunc(series, func(labels map[string]string) bool {
		for _, m := range matchers {
			if labels[m[1]] != m[2] {
				return false
			}
		}
		return true
	})
}
