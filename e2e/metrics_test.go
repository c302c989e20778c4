package e2e

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// errNoMetric: the page has no sample of the metric (with those labels).
var errNoMetric = errors.New("no such metric")

// scrapeMetric sums the samples of metric name at url (a /metrics page) whose labels
// include every one of labels (each `key="value"`); a metric with no such sample is
// an error.
func scrapeMetric(url, name string, labels ...string) (float64, error) {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	return sumMetric(url, string(body), name, labels...)
}

// sumMetric sums the samples of metric name on the /metrics page body (from url) as
// scrapeMetric does.
func sumMetric(url, body, name string, labels ...string) (float64, error) {
	sum, found := 0.0, false
	for line := range strings.Lines(body) {
		series, value, ok := strings.Cut(strings.TrimSpace(line), " ")
		if !ok || (series != name && !strings.HasPrefix(series, name+"{")) || !hasLabels(series, labels) {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum, found = sum+v, true
	}
	if !found {
		return 0, fmt.Errorf("%s: %s%v: %w", url, name, labels, errNoMetric)
	}
	return sum, nil
}

func hasLabels(series string, labels []string) bool {
	for _, l := range labels {
		if !strings.Contains(series, l) {
			return false
		}
	}
	return true
}

// adminMetric is scrapeMetric on a proxy's admin port; a sample that does not exist
// (yet) counts as 0, a scrape that fails fails the test.
func adminMetric(t *testing.T, admin, name string, labels ...string) float64 {
	t.Helper()
	v, err := scrapeMetric("http://"+admin+"/metrics", name, labels...)
	if err != nil && !errors.Is(err, errNoMetric) {
		t.Fatal(err)
	}
	return v
}

// metricValue reads a proxy's metric name: the sum over its series.
func metricValue(t *testing.T, p *meshProxy, name string) float64 {
	t.Helper()
	v, err := scrapeMetric("http://"+p.admin+"/metrics", name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// awaitMetric waits until ok holds for p's metric name (summed over the series with
// labels; 0 while there is none) and returns its value.
func awaitMetric(t *testing.T, p *meshProxy, name string, ok func(float64) bool, timeout time.Duration, labels ...string) float64 {
	t.Helper()
	var v float64
	waitFor(t, timeout, fmt.Sprintf("%s: metric %s%v", p.name, name, labels), func() error {
		var err error
		v, err = scrapeMetric("http://"+p.admin+"/metrics", name, labels...)
		switch {
		case err != nil && !errors.Is(err, errNoMetric):
			return err
		case !ok(v):
			return fmt.Errorf("value %v", v)
		}
		return nil
	})
	return v
}

// awaitMetricValue waits until p's metric name (with labels) equals want.
func awaitMetricValue(t *testing.T, p *meshProxy, name string, want float64, timeout time.Duration, labels ...string) {
	t.Helper()
	awaitMetric(t, p, name, func(v float64) bool { return v == want }, timeout, labels...)
}
