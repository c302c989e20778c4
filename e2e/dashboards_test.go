package e2e

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

const (
	dashboardFile  = "../deploy/grafana/agentmesh.json"
	alertRulesFile = "../deploy/prometheus/alerts.yaml"
)

// TestDashboardQueries checks the Grafana dashboard and the Prometheus alert rules in
// deploy/ against what a running mesh exports: a CA and two proxies carry traffic over
// the tls and h2 transports, one proxy rotates, the CA revokes an identity and starts
// a rotation of its intermediate, and the proxies cosign the CA's audit log, so that
// the labelled series exist. Then every PromQL expression of the dashboard (panel
// targets, template variables) and of the rules must parse as Prometheus parses it,
// and every metric it selects, with every label it matches or groups on, must be
// exported by the CA or one of the proxies: a renamed metric or label fails here, not
// on an operator's empty graph or silent alert.
func TestDashboardQueries(t *testing.T) {
	requireE2E(t)
	caMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	// Audit checkpoints every second: the proxies and the CA witness each other's logs.
	authority := startCAOn(t, host{}, fmt.Sprintf("127.0.0.1:%d", freePort(t)), 5*time.Minute,
		"--metrics", caMetrics, "--audit-checkpoint-interval", "1s")

	httpPort := serveHello(t)
	extra := "transports: [h2, tls]\nrevocation:\n  poll: 1s\naudit:\n  checkpoint_interval: 1s\n"
	idA := "spiffe://" + trustDomain + "/host/a"
	b := startProxy(t, authority, "b", nil, []service{{port: httpPort, allow: []string{idA}}}, extra)
	routes := map[string]string{}
	var rs []route
	for _, tr := range []string{"tls", "h2"} {
		routes[tr] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		rs = append(rs, route{listen: routes[tr], peer: b.tunnel, peerID: b.id, targetPort: httpPort, transport: tr})
	}
	a := startProxy(t, authority, "a", rs, nil, extra)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for tr, addr := range routes {
		for range 3 {
			if err := get(t.Context(), hc, "http://"+addr+"/dashboards"); err != nil {
				t.Fatalf("request over %s: %v", tr, err)
			}
		}
	}
	awaitMetric(t, a, "agentmesh_proxy_pool_connections", func(v float64) bool { return v >= 1 }, 30*time.Second, `transport="h2"`)

	// A rotation: the CA renews, the rotator counts it by trigger.
	if _, errOut, err := runCmd(t.Context(), "rotate", "--state", a.dir, "--reason", "e2e dashboards"); err != nil {
		t.Fatalf("agentmesh rotate: %v\n%s", err, errOut)
	}
	awaitRotated(t, a, a.id, "operator", time.Time{}, 30*time.Second)
	// A revocation: both proxies apply the deny-list, which times its lag.
	out, errOut, err := runCmd(t.Context(), "revoke", "--state", authority.state, "spiffe://"+trustDomain+"/host/gone", "--reason", "e2e dashboards")
	if err != nil {
		t.Fatalf("agentmesh revoke: %v\n%s", err, errOut)
	}
	version := listVersion(t, out)
	for _, p := range []*meshProxy{a, b} {
		awaitDenyList(t, p, version, 30*time.Second)
	}
	// A rotation of the trust anchors: its phases are timed from prepare on.
	if _, errOut, err := runCmd(t.Context(), "ca", "rotate", "intermediate", "--state", authority.state, "--reason", "e2e dashboards"); err != nil {
		t.Fatalf("agentmesh ca rotate intermediate: %v\n%s", err, errOut)
	}

	waitFor(t, 30*time.Second, "a proxy cosigning the ca's audit log", func() error {
		_, err := scrapeMetric("http://"+caMetrics+"/metrics", "agentmesh_ca_audit_ca_log_cosigned_age_seconds")
		return err
	})

	exported := exportedSeries{}
	exported.scrape(t, "the ca", "http://"+caMetrics+"/metrics")
	for _, p := range []*meshProxy{a, b} {
		exported.scrape(t, p.name, "http://"+p.admin+"/metrics")
	}

	panels := checkDashboard(t, exported)
	rules := checkRules(t, exported)
	// What the operator was promised: each item has its panel or its rule.
	for _, name := range []string{
		"agentmesh_proxy_handshakes_total", "agentmesh_proxy_handshake_duration_seconds_bucket",
		"agentmesh_rotator_svid_expiry_timestamp_seconds", "agentmesh_rotator_rotations_total",
		"agentmesh_revocation_list_apply_lag_seconds_bucket", "agentmesh_proxy_pool_connections",
		"agentmesh_proxy_streams_total", "agentmesh_audit_errors_total", "agentmesh_audit_checkpoint_lag_seconds",
		"agentmesh_ca_issue_duration_seconds_count", "agentmesh_ca_issue_duration_seconds_bucket",
	} {
		if !panels[name] {
			t.Errorf("%s: no panel selects %s", dashboardFile, name)
		}
	}
	for _, alert := range []string{"AgentmeshIdentityNotRenewed", "AgentmeshRevocationFeedStale", "AgentmeshAuditWriteErrors",
		"AgentmeshCARotationStuck", "AgentmeshCAAnchorExpiring", "AgentmeshHandshakesRefused"} {
		if !slices.Contains(rules, alert) {
			t.Errorf("%s: no rule %s", alertRulesFile, alert)
		}
	}
	fmt.Printf("dashboards: %d series names exported, %d metrics in the dashboard, %d rules checked\n",
		len(exported), len(panels), len(rules))
}

// exportedSeries maps each series name a scrape found (a histogram's as its _bucket,
// _sum and _count) to the names of its labels.
type exportedSeries map[string]map[string]bool

// scrape adds the series of the /metrics page at url, parsed as Prometheus does.
func (e exportedSeries) scrape(t *testing.T, who, url string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", who, err)
	}
	defer resp.Body.Close()
	tp := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := tp.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s: %v", who, err)
	}
	for name, mf := range mfs {
		names := []string{name}
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM:
			names = []string{name + "_bucket", name + "_sum", name + "_count"}
		case dto.MetricType_SUMMARY:
			names = append(names, name+"_sum", name+"_count")
		default:
			// Counters, gauges and untyped metrics are exposed under their own name.
		}
		for _, n := range names {
			if e[n] == nil {
				e[n] = map[string]bool{}
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					e[n][l.GetName()] = true
				}
			}
		}
		if mf.GetType() == dto.MetricType_HISTOGRAM {
			e[name+"_bucket"][model.BucketLabel] = true
		}
	}
}

// check parses expr (from where) and checks every metric it selects, with every label
// it matches on, against e, and every label it groups or matches vectors by (by, on)
// against the labels of the metrics under it; it returns the metric names.
func (e exportedSeries) check(t *testing.T, where, expr string) []string {
	t.Helper()
	node, err := parser.NewParser(parser.Options{}).ParseExpr(expandGrafanaVars(expr))
	if err != nil {
		t.Errorf("%s: %q: %v", where, expr, err)
		return nil
	}
	var names []string
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		switch n := n.(type) {
		case *parser.VectorSelector:
			names = append(names, n.Name)
			e.checkSelector(t, where, n)
		case *parser.AggregateExpr:
			if !n.Without {
				e.checkGrouping(t, where, n.Grouping, n.Expr)
			}
		case *parser.BinaryExpr:
			if n.VectorMatching != nil && n.VectorMatching.On {
				e.checkGrouping(t, where, n.VectorMatching.MatchingLabels, n.LHS, n.RHS)
			}
		}
		return nil
	})
	return names
}

func (e exportedSeries) checkSelector(t *testing.T, where string, vs *parser.VectorSelector) {
	t.Helper()
	labels, exported := e[vs.Name]
	switch {
	case vs.Name == "":
		t.Errorf("%s: %s selects no metric by name", where, vs)
	case !exported:
		t.Errorf("%s: %s: no CA or proxy exports %s", where, vs, vs.Name)
	default:
		for _, m := range vs.LabelMatchers {
			if !labels[m.Name] && !targetLabels[m.Name] {
				t.Errorf("%s: %s: %s has no label %q", where, vs, vs.Name, m.Name)
			}
		}
	}
}

// checkGrouping checks that each label of by is a label of a metric selected under
// nodes. A metric not exported was reported by checkSelector: its labels are unknown.
func (e exportedSeries) checkGrouping(t *testing.T, where string, by []string, nodes ...parser.Node) {
	t.Helper()
	under, known := map[string]bool{}, true
	for _, n := range nodes {
		parser.Inspect(n, func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok {
				known = known && e[vs.Name] != nil
				maps.Copy(under, e[vs.Name])
			}
			return nil
		})
	}
	if !known {
		return
	}
	for _, l := range by {
		if !under[l] && !targetLabels[l] {
			t.Errorf("%s: grouped by %q, which no metric under it has", where, l)
		}
	}
}

// targetLabels are the labels Prometheus gives every series it scrapes.
var targetLabels = map[string]bool{model.MetricNameLabel: true, model.JobLabel: true, model.InstanceLabel: true}

// grafanaVar is a dashboard variable in an expression: $name, ${name} or
// ${name:format}.
var grafanaVar = regexp.MustCompile(`\$\{?(\w+)(?::\w+)?\}?`)

// expandGrafanaVars replaces the variables Grafana expands before it sends a query:
// its interval variables by a duration, the others (label values, in matchers) by a
// regular expression.
func expandGrafanaVars(expr string) string {
	return grafanaVar.ReplaceAllStringFunc(expr, func(v string) string {
		switch grafanaVar.FindStringSubmatch(v)[1] {
		case "__rate_interval", "__interval", "__range":
			return "5m"
		case "__interval_ms", "__range_s", "__range_ms":
			return "300"
		default:
			return ".+"
		}
	})
}

// dashboard is what the test reads of a Grafana dashboard.
type dashboard struct {
	Panels     []dashboardPanel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Datasource json.RawMessage `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	Title      string           `json:"title"`
	Type       string           `json:"type"`
	Datasource json.RawMessage  `json:"datasource"`
	Panels     []dashboardPanel `json:"panels"` // a collapsed row's
	Targets    []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
}

// promDatasource is how every panel and query variable names its data source: the
// dashboard's datasource variable.
const promDatasource = `{"type":"prometheus","uid":"${datasource}"}`

// labelValues is Grafana's label_values(selector, label) variable query.
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

// checkDashboard checks every expression of the dashboard and returns the metrics it
// selects.
func checkDashboard(t *testing.T, e exportedSeries) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	selected := map[string]bool{}
	note := func(names []string) {
		for _, n := range names {
			selected[n] = true
		}
	}
	datasourceVar := false
	for _, v := range d.Templating.List {
		where := fmt.Sprintf("%s: variable %s", dashboardFile, v.Name)
		switch v.Type {
		case "datasource":
			datasourceVar = datasourceVar || (v.Name == "datasource" && string(v.Query) == `"prometheus"`)
		case "query":
			checkDatasource(t, where, v.Datasource)
			var q struct{ Query string }
			if err := json.Unmarshal(v.Query, &q); err != nil {
				t.Errorf("%s: query %s: %v", where, v.Query, err)
				continue
			}
			m := labelValues.FindStringSubmatch(q.Query)
			if m == nil {
				t.Errorf("%s: query %q is not label_values(selector, label)", where, q.Query)
				continue
			}
			names := e.check(t, where, m[1])
			for _, n := range names {
				if !e[n][m[2]] && !targetLabels[m[2]] {
					t.Errorf("%s: %s has no label %q", where, n, m[2])
				}
			}
			note(names)
		default:
			t.Errorf("%s: type %q is not checked", where, v.Type)
		}
	}
	if !datasourceVar {
		t.Errorf("%s: no variable datasource of type datasource for Prometheus", dashboardFile)
	}
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			where := fmt.Sprintf("%s: panel %q", dashboardFile, p.Title)
			checkDatasource(t, where, p.Datasource)
			if len(p.Targets) == 0 {
				t.Errorf("%s: no query", where)
			}
			for _, tg := range p.Targets {
				note(e.check(t, where+" query "+tg.RefID, tg.Expr))
			}
		}
	}
	walk(d.Panels)
	return selected
}

func checkDatasource(t *testing.T, where string, ds json.RawMessage) {
	t.Helper()
	var got, want any
	if json.Unmarshal(ds, &got) != nil || json.Unmarshal([]byte(promDatasource), &want) != nil || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%s: data source %s, want %s", where, ds, promDatasource)
	}
}

// checkRules loads the alert rules as Prometheus does (rulefmt: the format, every
// expression and template), checks every expression against e and that every rule
// has a severity and a summary, and returns the alerts' names.
func checkRules(t *testing.T, e exportedSeries) []string {
	t.Helper()
	groups, errs := rulefmt.ParseFile(alertRulesFile, false, model.UTF8Validation, parser.NewParser(parser.Options{}), slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Error(err)
	}
	if groups == nil {
		t.FailNow()
	}
	var alerts []string
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			where := fmt.Sprintf("%s: group %s rule %s", alertRulesFile, g.Name, r.Alert)
			if r.Alert == "" || !slices.Contains([]string{"critical", "warning"}, r.Labels["severity"]) ||
				strings.TrimSpace(r.Annotations["summary"]) == "" {
				t.Errorf("%s: lacks an alert name, a severity or a summary", where)
			}
			e.check(t, where, r.Expr)
			alerts = append(alerts, r.Alert)
		}
	}
	return alerts
}
