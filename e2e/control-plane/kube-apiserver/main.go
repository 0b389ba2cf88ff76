package main

import (
	"os"

	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	cmd := app.NewAPIServerCommand()
	if err := cmd.Execute(); err != nil {
		os.Exit(1)
	}
}
