package ca

import (
	"cmp"
	"crypto/sha256"
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The status page's document (GET /status/api, and the data the HTML is rendered
// from), gathered from what the CA holds: the directory, the fleet status store, the
// deny-list, the rotation of the trust anchors and the witness.

// statusDoc is the page's document.
type statusDoc struct {
	// Generation moves whenever anything the page shows changes (not the clock).
	Generation  uint64    `json:"generation"`
	Now         time.Time `json:"now"`
	TrustDomain string    `json:"trust_domain"`
	// DirectoryVersion is the directory document's version.
	DirectoryVersion uint64               `json:"directory_version"`
	Fleet            []fleetRow           `json:"fleet"`
	Identities       []identityRow        `json:"identities"`
	Timeline         []timelineRow        `json:"timeline"`
	ListVersion      uint64               `json:"revocation_list_version"`
	Revocations      []revocationRow      `json:"revocations"`
	Rotation         rotationView         `json:"rotation"`
	Witness          []witnessRow         `json:"witness"`
	Anchors          []meshapi.AnchorInfo `json:"anchors"`
}

type fleetRow struct {
	Host          string    `json:"host"`
	LastHeartbeat time.Time `json:"last_heartbeat"`
	Version       string    `json:"version,omitempty"`
	BundleVersion string    `json:"bundle_version,omitempty"`
	// Reported: the proxy sent a valid status; Ready and NotReady are its /readyz.
	Reported bool   `json:"reported"`
	Ready    bool   `json:"ready"`
	NotReady string `json:"not_ready,omitempty"`
	Invalid  string `json:"invalid,omitempty"` // why its last status was dropped
	// Truncated: the proxy reported as many identities as it may
	// (meshapi.MaxProxyStatusIdentities), so it may hold more than the page shows.
	Truncated  bool     `json:"truncated,omitempty"`
	Addresses  []string `json:"addresses"`
	TunnelPort uint16   `json:"tunnel_port"`
	Transports []string `json:"transports"`
}

type identityRow struct {
	SPIFFEID string    `json:"spiffe_id"`
	Host     string    `json:"host"`
	Serial   string    `json:"serial,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	RenewAt  time.Time `json:"renew_at,omitzero"`
	State    string    `json:"state"`
	Ready    bool      `json:"ready"`
	Error    string    `json:"error,omitempty"`
}

type timelineRow struct {
	SPIFFEID string       `json:"spiffe_id"`
	Host     string       `json:"host"`
	Segments []keySegment `json:"segments"`
}

type revocationRow struct {
	SPIFFEID  string    `json:"spiffe_id,omitempty"`
	Serial    string    `json:"serial,omitempty"`
	Initiator string    `json:"initiator,omitempty"` // "" when revoked before the CA last started
	RevokedAt time.Time `json:"revoked_at"`
	Reason    string    `json:"reason,omitempty"`
	Cutoff    time.Time `json:"cutoff,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	Version   uint64    `json:"version"` // the list version that first carried it
}

type rotationView struct {
	ID         uint64    `json:"id,omitempty"`
	Phase      string    `json:"phase"` // "" when no rotation runs
	LastPhase  string    `json:"last_phase,omitempty"`
	Kind       string    `json:"kind,omitempty"`
	Started    time.Time `json:"started,omitzero"`
	PhaseSince time.Time `json:"phase_since,omitzero"`
	Waiting    string    `json:"waiting,omitempty"`
	Missing    []string  `json:"missing"`
	Error      string    `json:"error,omitempty"`
}

type witnessRow struct {
	Origin   string    `json:"origin"`
	Size     uint64    `json:"size"`
	LastSeen time.Time `json:"last_seen,omitzero"`
	State    string    `json:"state"`
}

// statusDocument gathers the page's document at now.
func (s *Server) statusDocument(now time.Time) statusDoc {
	dir := s.dir.snapshot(now)
	live := make(map[spiffeid.ID]struct{}, len(dir.Peers))
	for _, p := range dir.Peers {
		live[p.SPIFFEID] = struct{}{}
	}
	s.status.forget(func(id spiffeid.ID) bool { _, ok := live[id]; return ok })
	rot := s.AnchorRotationStatus()
	doc := statusDoc{TrustDomain: s.cfg.TrustDomain.Name(), DirectoryVersion: dir.Version,
		Rotation: rotationOf(rot), Anchors: rot.Anchors, Fleet: []fleetRow{}, Identities: []identityRow{},
		Revocations: []revocationRow{}, Witness: []witnessRow{}}
	hosts, timeline, revokers := s.status.view()
	for _, p := range dir.Peers {
		doc.Fleet = append(doc.Fleet, fleetRowOf(p, hosts[p.SPIFFEID]))
		if st := hosts[p.SPIFFEID].status; st != nil {
			doc.Identities = append(doc.Identities, identityRows(p.SPIFFEID, st)...)
		}
	}
	doc.Timeline = timeline
	if dl := s.deny.Load(); dl != nil && dl.list != nil {
		doc.ListVersion = dl.list.Version
		doc.Revocations = revocationRows(dl.list, revokers)
	}
	for _, wl := range s.witnessStatus(now) {
		doc.Witness = append(doc.Witness, witnessRow{Origin: wl.Origin, Size: cosignedSize(wl.Latest),
			LastSeen: wl.LastSeen, State: wl.State})
	}
	doc.Generation = s.status.generation(doc)
	doc.Now = now.UTC().Round(0)
	return doc
}

func fleetRowOf(p meshapi.DirectoryEntry, hs hostStatus) fleetRow {
	row := fleetRow{Host: p.SPIFFEID.String(), LastHeartbeat: p.LastHeartbeat.UTC(), BundleVersion: p.BundleVersion,
		TunnelPort: p.TunnelPort, Transports: slices.Clone(p.Transports), Invalid: hs.invalid,
		Addresses: []string{}}
	for _, a := range p.Addresses {
		row.Addresses = append(row.Addresses, a.String())
	}
	if st := hs.status; st != nil {
		row.Reported, row.Version, row.Ready, row.NotReady = true, st.Version, st.Ready, st.NotReady
		row.Truncated = len(st.Identities) >= meshapi.MaxProxyStatusIdentities
	}
	return row
}

// identityRows are the identities host reports, with their current key: the first.
func identityRows(host spiffeid.ID, st *meshapi.ProxyStatus) []identityRow {
	var out []identityRow
	for _, is := range st.Identities {
		row := identityRow{SPIFFEID: is.SPIFFEID, Host: host.String(), RenewAt: is.RenewAt.UTC(),
			Ready: is.Ready, Error: is.Error, State: "none"}
		if len(is.Keys) > 0 {
			k := is.Keys[0]
			row.Serial, row.NotAfter, row.State = k.Serial, k.NotAfter.UTC(), k.State
		}
		out = append(out, row)
	}
	return out
}

func revocationRows(l *meshapi.DenyList, revokers map[string]string) []revocationRow {
	out := []revocationRow{}
	for _, d := range l.IDs {
		out = append(out, revocationRow{SPIFFEID: d.SPIFFEID.String(), Initiator: revokers[revokerKeyID(d.SPIFFEID.String())],
			RevokedAt: d.RevokedAt, Reason: d.Reason, Cutoff: d.NotBefore, NotAfter: d.NotAfter, Version: d.Version})
	}
	for _, d := range l.Serials {
		row := revocationRow{Serial: d.Serial, Initiator: revokers[revokerKeySerial(d.Serial)],
			RevokedAt: d.RevokedAt, Reason: d.Reason, NotAfter: d.NotAfter, Version: d.Version}
		if !d.SPIFFEID.IsZero() {
			row.SPIFFEID = d.SPIFFEID.String()
			if row.Initiator == "" {
				row.Initiator = revokers[revokerKeyID(row.SPIFFEID)] // a lineage revocation's serials
			}
		}
		out = append(out, row)
	}
	// Newest first: what the operator just did is at the top.
	slices.SortStableFunc(out, func(a, b revocationRow) int { return b.RevokedAt.Compare(a.RevokedAt) })
	return out
}

func rotationOf(st meshapi.RotationStatus) rotationView {
	v := rotationView{ID: st.ID, Kind: string(st.Kind), Started: st.Started, PhaseSince: st.PhaseSince,
		Waiting: st.Waiting, Error: st.Error, Missing: []string{}}
	if st.ID != 0 && !st.Phase.Ended() {
		v.Phase = string(st.Phase)
		for _, m := range st.Missing {
			v.Missing = append(v.Missing, m.String())
		}
	} else {
		v.LastPhase = string(st.Phase)
	}
	return v
}

// cosignedSize is the tree size of a cosigned checkpoint note (0 when none or
// unreadable): its body is the checkpoint's text.
func cosignedSize(note string) uint64 {
	body, _, ok := strings.Cut(note, "\n\n")
	if !ok {
		return 0
	}
	c, err := audit.ParseCheckpoint(body + "\n")
	if err != nil {
		return 0
	}
	return c.Size
}

// view returns copies of the hosts' statuses (immutable once stored), the timeline
// sorted by identity and the revokers.
func (f *fleetStatus) view() (map[spiffeid.ID]hostStatus, []timelineRow, map[string]string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	hosts := make(map[spiffeid.ID]hostStatus, len(f.hosts))
	for h, hs := range f.hosts {
		hosts[h] = hs
	}
	timeline := make([]timelineRow, 0, len(f.ids))
	for id, tl := range f.ids {
		row := timelineRow{SPIFFEID: id.String(), Host: tl.host.String(), Segments: []keySegment{}}
		versions := mapKeys(tl.keys)
		slices.Sort(versions)
		for _, v := range versions {
			row.Segments = append(row.Segments, tl.keys[v].segments(v)...)
		}
		timeline = append(timeline, row)
	}
	slices.SortFunc(timeline, func(a, b timelineRow) int { return cmp.Compare(a.SPIFFEID, b.SPIFFEID) })
	revokers := make(map[string]string, len(f.revokers))
	for k, v := range f.revokers {
		revokers[k] = v
	}
	return hosts, timeline, revokers
}

// generation returns the generation of doc (Generation and Now unset): the previous
// one when nothing in it changed, the next otherwise.
func (f *fleetStatus) generation(doc statusDoc) uint64 {
	b, err := json.Marshal(doc)
	if err != nil {
		// Every time in doc was checked to encode; count it as a change.
		b = strconv.AppendUint(nil, uint64(time.Now().UnixNano()), 10)
	}
	sum := sha256.Sum256(b)
	f.mu.Lock()
	defer f.mu.Unlock()
	if sum != f.sum || f.gen == 0 {
		f.sum = sum
		f.gen++
	}
	return f.gen
}

func revokerKeyID(id string) string         { return "id " + id }
func revokerKeySerial(serial string) string { return "serial " + serial }

// maxRevokers bounds the initiators remembered (the deny-list drops expired entries;
// this drops the oldest remembered when full).
const maxRevokers = 4096

// revokedBy remembers who revoked req, for the page (the deny-list does not carry it).
func (f *fleetStatus) revokedBy(req meshapi.RevokeRequest, initiator string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range []string{req.SPIFFEID, req.Serial} {
		if k == "" {
			continue
		}
		key := revokerKeyID(k)
		if k == req.Serial {
			key = revokerKeySerial(k)
		}
		if _, ok := f.revokers[key]; !ok {
			f.revokerOrder = append(f.revokerOrder, key)
		}
		f.revokers[key] = initiator
	}
	for len(f.revokerOrder) > maxRevokers {
		delete(f.revokers, f.revokerOrder[0])
		f.revokerOrder = f.revokerOrder[1:]
	}
}
