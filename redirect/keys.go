package redirect

// Log attribute keys.
const (
	keyFamily = "family" // "ipv4" | "ipv6"
	keyRules  = "rules"  // number of rules agentmesh owns in that family's nat table
	keyErr    = "err"
)
