package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/node"
)

func newProxyCmd() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run the per-host mTLS proxy and its identity rotator",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := node.LoadConfig(configPath)
			if err != nil {
				return err
			}
			level, _ := cfg.Log.SlogLevel() // validated with the config
			return node.Run(cmd.Context(), cfg, newLogger(os.Stderr, level, cfg.Log.Format))
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "proxy configuration file (YAML)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}
