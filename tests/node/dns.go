package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// runDNS answers A queries for <service>.<namespace>.svc.<domain> with the Service's
// ClusterIP (from a watch on Services), and the names given with --host: what pods of the
// end-to-end suite resolve (the operator's Service, the API server's, a stand-in partner).
// Every other name is NXDOMAIN: the suite's node reaches nothing outside it. UDP only,
// which is what a pod's resolver asks first.
func runDNS(args []string) error {
	fs := flag.NewFlagSet("dns", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	listen := fs.String("listen", "0.0.0.0:53", "UDP address to answer on")
	domain := fs.String("cluster-domain", "cluster.local", "cluster domain")
	hosts := map[string]net.IP{}
	fs.Func("host", "NAME=IPv4: also answer NAME (a stand-in partner's host name); repeatable", func(v string) error {
		name, addr, ok := strings.Cut(v, "=")
		ip := net.ParseIP(addr).To4()
		if !ok || name == "" || ip == nil {
			return fmt.Errorf("--host %q: want NAME=IPv4", v)
		}
		hosts[strings.ToLower(strings.TrimSuffix(name, "."))+"."] = ip
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	factory := informers.NewSharedInformerFactory(client, 0)
	services := factory.Core().V1().Services().Informer()
	var mu sync.RWMutex
	ips := map[string]net.IP{}
	for name, ip := range hosts {
		ips[name] = ip
	}
	key := func(s *corev1.Service) string {
		return strings.ToLower(fmt.Sprintf("%s.%s.svc.%s.", s.Name, s.Namespace, strings.TrimSuffix(*domain, ".")))
	}
	set := func(obj interface{}) {
		s, ok := obj.(*corev1.Service)
		if !ok {
			return
		}
		ip := net.ParseIP(s.Spec.ClusterIP).To4()
		mu.Lock()
		defer mu.Unlock()
		if ip == nil {
			delete(ips, key(s))
		} else {
			ips[key(s)] = ip
		}
	}
	_, _ = services.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    set,
		UpdateFunc: func(_, obj interface{}) { set(obj) },
		DeleteFunc: func(obj interface{}) {
			if s, ok := obj.(*corev1.Service); ok {
				mu.Lock()
				delete(ips, key(s))
				mu.Unlock()
			}
		},
	})
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())

	conn, err := net.ListenPacket("udp4", *listen)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); conn.Close() }()
	fmt.Fprintf(os.Stderr, "dns: answering on %s for *.svc.%s\n", conn.LocalAddr(), *domain)
	buf := make([]byte, 1500)
	for {
		n, peer, err := conn.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		var p dnsmessage.Parser
		h, err := p.Start(buf[:n])
		if err != nil {
			continue
		}
		q, err := p.Question()
		if err != nil {
			continue
		}
		reply := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
		name := strings.ToLower(q.Name.String())
		mu.RLock()
		ip, found := ips[name]
		mu.RUnlock()
		if !found {
			reply.RCode = dnsmessage.RCodeNameError
		}
		b := dnsmessage.NewBuilder(nil, reply)
		b.EnableCompression()
		_ = b.StartQuestions()
		_ = b.Question(q)
		if found && q.Type == dnsmessage.TypeA {
			_ = b.StartAnswers()
			var a [4]byte
			copy(a[:], ip)
			_ = b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: a})
		}
		out, err := b.Finish()
		if err == nil {
			_, _ = conn.WriteTo(out, peer)
		}
	}
}
