// Package audit owns agentmesh's append-only audit log: one JSON line per event
// (handshake, rotation, connection, ...), hash-chained, group-committed with fsync, and its
// verification. It does not decide what is audited or what to do when the log fails (the
// proxy, rotator and CA do: by default they refuse work they cannot record), it does not
// rotate, ship or index files, and it does not yet write signed checkpoints.
//
// # Typed values
//
// The record fields that producers and readers compare or switch on are typed constants
// (result.go: Result, LoadResult, AuthzResult, KeyPhase, KeyKind; issuance.go), so a
// misspelt value does not compile and golangci-lint's exhaustive checks every switch over
// them. Their strings are the wire format and never change.
//
// # Record format
//
// Each line is one record:
//
//	{"seq":N,"time":"RFC3339Nano","type":"handshake","prev":"<hex sha256>",<event fields>,"hash":"<hex sha256>"}
//
// seq starts at 1 and grows by one. The event's own fields (its JSON encoding) follow the
// header flat, so a SIEM reads one level of keys. hash is the SHA-256 of the line without
// its `,"hash":"…"` suffix, that is of `{"seq":…,<event fields>}`; prev is the hash of the
// previous record, 64 zeros for the first. seq, time and prev are assigned by the writer as
// it writes, so the order on disk is the chain order.
//
// # Writing
//
// Open opens or creates the file and continues the chain from its last record, truncating a
// torn last line left by a crash. Run is the single writer: it drains the queue, writes the
// batch through a buffer and fsyncs once per batch, so a burst of handshakes costs one fsync
// rather than one each. Append is the hot path: it marshals the event and queues it; it never
// drops a record and blocks while the queue is full. Sync waits until everything appended
// before it is on disk: a nil Sync is the acknowledgement that those records are durable.
// After a write or fsync failure (a full disk) the log refuses further records while it
// lasts: Append, Sync and Err return an error wrapping ErrUnavailable, and callers refuse
// the work they cannot audit. Meanwhile Run cuts the file back to its last durable record,
// so no half-written line stays, and retries the failed batch every RetryInterval (doubling
// to 1s); the first retry that is durable ends the failure, and the chain goes on from the
// last durable record without a gap. A crash during a failure loses only the batch that was
// never acknowledged; Open truncates any torn line.
//
// # What Verify detects
//
// Verify checks every line in one streaming pass and names the first bad record by seq and
// line number (*VerifyError). It detects:
//   - an edited record, including the last one: its hash no longer matches its content;
//   - a removed record, the first one included: the seq of the record after it jumps;
//   - an inserted or duplicated record: seq repeats or prev does not match;
//   - reordered records: seq goes out of order;
//   - a malformed or torn line (a crash mid-write, or an edit that is not a valid record).
//
// It does not detect:
//   - truncation of the tail: removing the last k records leaves a valid, shorter chain;
//   - a rewrite by someone who recomputes the hashes from the edited record to the end: the
//     chain uses no secret, so it proves integrity against accidents and naive edits, not
//     against an attacker with write access to the file.
//
// Both are future work for signed checkpoints: every N records or seconds the proxy will
// sign (seq, hash) with its own key and send it to the CA, anchoring the chain outside the
// host.
package audit
