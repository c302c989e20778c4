// Package meshapi is the mesh API between agentmesh ca and the proxies, as data: the
// wire types of every request and answer (the directory document, registrations,
// revocations, reinstatements, agent tokens, registration entries, address claims,
// step-ca's sign bodies), their validation, the signed deny-list and its verification,
// and one immutable State, the mesh as a proxy holds it. Both sides import it: ca
// serves the API (Mount, with the CA as its Backend), meshclient consumes it.
//
// # State
//
// A State is one directory version (NewState, DecodeState): the routes to the other
// proxies by address (PeerFor, TransportsFor), the registration entries (Entries) and
// the agents by address (AgentsAt), the fleet rotation announced (Rotation), the trust
// bundle the CA published and its version (Bundle, BundleVersion), and the verified
// deny-list in force (DenyList). It is never modified: WithDirectory and
// WithDenyList return new ones, so a holder publishes each behind an atomic pointer
// and readers need no lock. A document with one malformed entry is refused whole: the
// CA validates every entry, so one that is not is a fault, and a partial directory
// would misroute.
//
// # Deny-list
//
// DenyList is one version of the CA's revocation list, cumulative but for expiry;
// SignedDenyList carries it with the CA intermediate's signature. The CA builds the next
// version (Successor, FirstDenyList) and signs it (SignDenyList); a proxy verifies it
// (VerifyDenyList) and accepts only a newer one that extends what it holds
// (NextDenyList). See docs/directory.md for the format and the rules.
//
// # Requests
//
// Request bodies decode strictly (DecodeStrict: one JSON object, no unknown fields)
// and validate without the CA's state: ParseRegistration, ParseWatchQuery,
// RevokeRequest.Check, ReinstateRequest.Check. Every request body has a fuzz target
// (fuzz_test.go). The package imports nothing of agentmesh's but internal leaves.
package meshapi
