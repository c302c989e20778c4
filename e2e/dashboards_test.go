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
	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
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

// loadRules loads the alert rules as Prometheus does (rulefmt: the format, every
// expression and template).
func loadRules(t *testing.T) *rulefmt.RuleGroups {
	t.Helper()
	groups, errs := rulefmt.ParseFile(alertRulesFile, false, model.UTF8Validation, parser.NewParser(parser.Options{}), slog.New(slog.DiscardHandler))
	if len(errs) > 0 || groups == nil {
		t.Fatalf("%s: %v", alertRulesFile, errs)
	}
	return groups
}

// checkRules checks every expression of the alert rules against e and that every rule
// has a severity and a summary, and returns the alerts' names.
func checkRules(t *testing.T, e exportedSeries) []string {
	t.Helper()
	var alerts []string
	for _, g := range loadRules(t).Groups {
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

// TestAlertRulesFire evaluates the alert rules' expressions with Prometheus's engine on
// series shaped as the mesh exports them: each fires for the case it is written for
// and not for its look-alike (an identity renewed or dropped, a past phase, refusals
// few or a small share). Only the expressions: their `for` is Prometheus's own.
func TestAlertRulesFire(t *testing.T) {
	exprs := map[string]string{}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			exprs[r.Alert] = r.Expr
		}
	}
	// One sample a minute for 200 minutes from time 0 (time() is the evaluation's Unix
	// time, in seconds); the instance label names each case.
	constant := func(v float64) func(int) float64 { return func(int) float64 { return v } }
	ramp := func(perMinute float64) func(int) float64 {
		return func(m int) float64 { return perMinute * float64(m) }
	}
	from := func(minute int, before, after float64) func(int) float64 {
		return func(m int) float64 {
			if m < minute {
				return before
			}
			return after
		}
	}
	db := memSeries(t, map[string]func(int) float64{
		`agentmesh_rotator_svid_renew_timestamp_seconds{instance="late"}`:             constant(600),
		`agentmesh_rotator_svid_expiry_timestamp_seconds{instance="late"}`:            constant(900),
		`agentmesh_rotator_svid_renew_timestamp_seconds{instance="renewed"}`:          from(10, 600, 1200),
		`agentmesh_rotator_svid_expiry_timestamp_seconds{instance="renewed"}`:         from(10, 900, 1500),
		`agentmesh_rotator_svid_renew_timestamp_seconds{instance="dropped"}`:          constant(0),
		`agentmesh_rotator_svid_expiry_timestamp_seconds{instance="dropped"}`:         constant(0),
		`agentmesh_revocation_list_confirmed_timestamp_seconds{instance="fresh"}`:     ramp(60),
		`agentmesh_revocation_list_confirmed_timestamp_seconds{instance="stale"}`:     constant(60),
		`agentmesh_audit_errors_total{instance="failing",op="fsync"}`:                 from(3, 0, 1),
		`agentmesh_audit_errors_total{instance="refusing",op="encode"}`:               ramp(1),
		`agentmesh_proxy_handshakes_total{instance="spike",result="refused"}`:         ramp(120),
		`agentmesh_proxy_handshakes_total{instance="spike",result="ok"}`:              ramp(600),
		`agentmesh_proxy_handshakes_total{instance="few",result="refused"}`:           ramp(6),
		`agentmesh_proxy_handshakes_total{instance="few",result="ok"}`:                ramp(6),
		`agentmesh_proxy_handshakes_total{instance="busy",result="refused"}`:          ramp(120),
		`agentmesh_proxy_handshakes_total{instance="busy",result="ok"}`:               ramp(6000),
		`agentmesh_ca_rotation_phase{instance="stuck",phase="distribute"}`:            constant(1),
		`agentmesh_ca_rotation_phase_seconds{instance="stuck",phase="distribute"}`:    ramp(60),
		`agentmesh_ca_rotation_phase{instance="moving",phase="prepare"}`:              constant(0),
		`agentmesh_ca_rotation_phase_seconds{instance="moving",phase="prepare"}`:      constant(20000),
		`agentmesh_ca_rotation_phase{instance="moving",phase="activate"}`:             constant(1),
		`agentmesh_ca_rotation_phase_seconds{instance="moving",phase="activate"}`:     ramp(1),
		`agentmesh_ca_rotation_phase{instance="ended",phase="done"}`:                  constant(1),
		`agentmesh_ca_rotation_phase_seconds{instance="ended",phase="done"}`:          constant(20000),
		`agentmesh_ca_anchor_not_after_seconds{instance="soon",role="root"}`:          constant(20 * 86400),
		`agentmesh_ca_anchor_not_after_seconds{instance="later",role="intermediate"}`: constant(40 * 86400),
	})
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 100000, Timeout: 10 * time.Second, LookbackDelta: 5 * time.Minute,
		Parser: parser.NewParser(parser.Options{})})
	for _, tc := range []struct {
		alert string
		at    time.Duration
		fire  []string // the instances it fires for
	}{
		{"AgentmeshIdentityNotRenewed", 10 * time.Minute, nil}, // at its renewal time
		{"AgentmeshIdentityNotRenewed", 11 * time.Minute, []string{"late"}},
		{"AgentmeshRevocationFeedStale", 10 * time.Minute, []string{"stale"}},
		{"AgentmeshAuditWriteErrors", 2 * time.Minute, nil},
		{"AgentmeshAuditWriteErrors", 8 * time.Minute, []string{"failing"}},
		{"AgentmeshHandshakesRefused", 6 * time.Minute, []string{"spike"}},
		{"AgentmeshCARotationStuck", 3 * time.Hour, nil},
		{"AgentmeshCARotationStuck", 3*time.Hour + 2*time.Minute, []string{"stuck"}},
		{"AgentmeshCAAnchorExpiring", 10 * time.Minute, []string{"soon"}},
	} {
		t.Run(fmt.Sprintf("%s at %v", tc.alert, tc.at), func(t *testing.T) {
			expr, ok := exprs[tc.alert]
			if !ok {
				t.Fatalf("%s has no rule %s", alertRulesFile, tc.alert)
			}
			q, err := engine.NewInstantQuery(t.Context(), db, nil, expr, time.Unix(0, 0).Add(tc.at))
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			vec, err := q.Exec(t.Context()).Vector()
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range vec {
				got = append(got, s.Metric.Get(model.InstanceLabel))
			}
			slices.Sort(got)
			if !slices.Equal(got, tc.fire) {
				t.Errorf("fires for %v, want %v", got, tc.fire)
			}
		})
	}
}

// memSeries is a queryable holding each series (a metric literal) with one sample a
// minute for 200 minutes, value(minute).
func memSeries(t *testing.T, series map[string]func(int) float64) storage.Queryable {
	t.Helper()
	var all []storage.Series
	for metric, value := range series {
		lset, err := parser.NewParser(parser.Options{}).ParseMetric(metric)
		if err != nil {
			t.Fatal(err)
		}
		samples := make([]chunks.Sample, 200)
		for m := range samples {
			samples[m] = floatSample{t: int64(m) * time.Minute.Milliseconds(), f: value(m)}
		}
		all = append(all, storage.NewListSeries(lset, samples))
	}
	slices.SortFunc(all, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
	return &storage.MockQueryable{MockQuerier: &storage.MockQuerier{
		SelectMockFunction: func(_ bool, _ *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
			var sel []storage.Series
			for _, s := range all {
				if slices.IndexFunc(ms, func(m *labels.Matcher) bool { return !m.Matches(s.Labels().Get(m.Name)) }) < 0 {
					sel = append(sel, s)
				}
			}
			return &listSeriesSet{series: sel, i: -1}
		}}}
}

type listSeriesSet struct {
	series []storage.Series
	i      int
}

func (s *listSeriesSet) Next() bool                      { s.i++; return s.i < len(s.series) }
func (s *listSeriesSet) At() storage.Series              { return s.series[s.i] }
func (*listSeriesSet) Err() error                        { return nil }
func (*listSeriesSet) Warnings() annotations.Annotations { return nil }

// floatSample is a float sample at t (milliseconds).
type floatSample struct {
	t int64
	f float64
}

func (s floatSample) T() int64                    { return s.t }
func (floatSample) ST() int64                     { return 0 }
func (s floatSample) F() float64                  { return s.f }
func (floatSample) H() *histogram.Histogram       { return nil }
func (floatSample) FH() *histogram.FloatHistogram { return nil }
func (floatSample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s floatSample) Copy() chunks.Sample         { return s }
