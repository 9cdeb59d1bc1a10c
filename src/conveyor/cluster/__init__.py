"""Everything that talks to a Kubernetes apiserver goes through this package."""
