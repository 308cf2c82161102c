// Command node runs the node-side Kubernetes components the end-to-end tests
// need to run real pods, all from one binary built from the official
// k8s.io/kubernetes module:
//
//	node kubelet [kubelet flags...]
//	node controller-manager [kube-controller-manager flags...]
//	node scheduler [kube-scheduler flags...]
//	node kube-proxy [kube-proxy flags...]
//	node dns --kubeconfig FILE [--listen ADDR] [--cluster-domain D]
//
// They are v1.35, the last minor whose kubelet works with containerd 1.x (the
// runtime Debian ships) and on cgroup v1 (with failCgroupV1: false); it is
// within the supported skew of the v1.36 API server the control plane runs.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kubeproxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: node kubelet|controller-manager|scheduler|kube-proxy|dns [flags...]")
		os.Exit(2)
	}
	var cmd *cobra.Command
	switch os.Args[1] {
	case "kubelet":
		cmd = kubelet.NewKubeletCommand(context.Background())
	case "controller-manager":
		cmd = controllermanager.NewControllerManagerCommand()
	case "scheduler":
		cmd = scheduler.NewSchedulerCommand()
	case "kube-proxy":
		cmd = kubeproxy.NewProxyCommand()
	case "dns":
		if err := runDNS(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "node dns: %v\n", err)
			os.Exit(1)
		}
		return
	default:
		fmt.Fprintf(os.Stderr, "node: unknown component %q\n", os.Args[1])
		os.Exit(2)
	}
	cmd.SetArgs(os.Args[2:])
	os.Exit(cli.Run(cmd))
}
