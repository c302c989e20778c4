// Package siem delivers every record of an audit log to a SIEM as RFC 5424 syslog over
// TLS (RFC 5425, octet-counting framing). The log on disk is the spool: a Sink follows
// the log's files as they grow, keeps its place in a cursor file beside the log, and
// after a broken connection resends what it wrote shortly before the break, since TLS
// syslog has no acknowledgement. It does not write, rotate or verify the log (package
// audit does; it reads only seq, time, type, prev, hash and result), or drop records: a
// receiver that is away leaves a backlog, which is reported, never discarded.
//
// # Delivery promise
//
// At least once, with duplicates bounded: after a connection fails, the Sink sends
// again every record it had written less than Config.ResendWindow (default 2s) before it
// noticed the failure, because those may have been in flight or in the receiver's
// buffers. A receiver de-duplicates by the seq in the structured data. After a crash of
// the process the Sink resends from its cursor file, written at most every second and
// never past that window, so at most about ResendWindow + 1s of records come twice.
// When the log's writer cuts off a batch it could not fsync and writes it again, the
// Sink, which may have sent some of it, notices by the records' hash chain and sends
// the records again as they were rewritten: the receiver then holds two versions of
// those seqs, of which the later is the log's.
//
// # Message
//
//	LEN SP <110>1 TIMESTAMP HOSTNAME agentmesh - TYPE [agentmesh@32473 seq="N" origin="O"] JSON
//
// PRI 110 is facility 13 (log audit), severity 6 (informational). TIMESTAMP is the
// record's time in microseconds, MSGID its type, MSG the record's JSON line unchanged, so
// the receiver can check its hash chain.
package siem
