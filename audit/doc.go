// Package audit owns agentmesh's append-only audit log: one JSON line per event
// (handshake, rotation, connection, ...), hash-chained, group-committed with fsync, a
// Merkle tree over the records with signed checkpoints that a witness cosigns, size
// rotation into segments, inclusion and consistency proofs, and verification. It does not
// decide what is audited or what to do when the log fails (the proxy, rotator and CA do:
// by default they refuse work they cannot record), it does not hold keys (Config.Signer
// is given, typically a PKCS#11 key) or speak to the witness (Config.Witness is given),
// and it does not ship or index files (audit/siem reads them with Scan).
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
// On its own the chain does not detect a cut tail (the last k records removed) or a
// rewrite by someone who recomputes the hashes from the edited record to the end: it uses
// no secret. The Merkle tree and its witnessed checkpoints do.
//
// # Merkle tree, checkpoints and the witness
//
// Leaf i of the tree is the record with seq i+1, hashed as RFC 6962 does
// (tlog.RecordHash of its line without the newline), with golang.org/x/mod/sumdb/tlog:
// the Go checksum database's own code, whose proofs and C2SP checkpoint and signed-note
// formats other tools read. The writer keeps the tree's right edge in memory (appending
// costs a leaf hash and on average one node hash, no reads) and its stored hashes in
// Path + ".hashes" for proofs. That file is derived data: fsynced before each checkpoint,
// trusted by Open up to the latest checkpoint and recomputed from the records beyond it,
// never trusted by VerifyLog.
//
// With Config.Signer, the writer signs a checkpoint (origin, size, root) of its durable
// records every CheckpointRecords records or CheckpointInterval while the log grows,
// keeps it in Path + ".checkpoint", and has Config.Witness cosign it with a consistency
// proof from the last checkpoint the witness cosigned (Path + ".cosigned"). A witness
// cosigns only a checkpoint that extends the one it holds, so after a record is in a
// cosigned checkpoint no one on the host can change, remove or reorder it, or cut the log
// after it, without VerifyLog against the witness naming the first index that differs.
// Witnessing never holds up Append: failures are counted and retried at the next tick.
//
// # Segments
//
// Past Config.MaxFileBytes the active file is renamed to SegmentName(Path, first seq) and
// a new one continues the seq, the chain and the tree. Scan reads records across them;
// VerifyLog checks them all, and a missing segment is named by the seq it held.
package audit
