// Command etcd runs etcd's own entry point; it exists only because etcd's main module
// carries replace directives and so cannot be installed with `go install pkg@version`.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
