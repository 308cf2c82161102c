// Command controlplane runs a single-node Kubernetes control plane for Tollgate's
// end-to-end tests: etcd embedded in-process and the real kube-apiserver command,
// both on 127.0.0.1. It makes its own CA, serving and admin client certificates,
// an admin kubeconfig and a ServiceAccount signing key, so TokenRequest and
// TokenReview work. There is no controller-manager, scheduler or kubelet here (tests/node
// has them, for the suite that runs real pods, with --node-ip): other tests
// create the ServiceAccounts and other objects they need themselves.
//
// Once /readyz answers OK it prints exactly one line on stdout:
//
//	READY kubeconfig=DIR/kubeconfig server=https://127.0.0.1:PORT
//
// Everything else goes to stderr. It shuts down on SIGTERM/SIGINT and, unless
// --exit-on-stdin-eof=false, when stdin reaches EOF: the test process holds the
// write end of that pipe, so a test that dies without cleaning up never leaks a
// control plane.
//
// Usage: controlplane [--dir DIR] [--v N] [-- extra kube-apiserver flags...]
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// Issuer and audiences of ServiceAccount tokens. "tollgate" is the audience the
// sidecar asks for when it reviews a caller's token.
const (
	saIssuer    = "https://kubernetes.default.svc"
	apiAudience = saIssuer + ",tollgate"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	flags := flag.NewFlagSet("controlplane", flag.ContinueOnError)
	dir := flags.String("dir", "", "directory for kubeconfig, certificates and etcd data (default: a temporary directory removed on exit)")
	verbosity := flags.Int("v", 0, "kube-apiserver log verbosity (klog --v)")
	stdinEOF := flags.Bool("exit-on-stdin-eof", true, "shut down when stdin reaches EOF")
	nodeIP := flags.String("node-ip", "", "also serve on this address and publish it as the kubernetes Service's endpoint, for pods of a real node (default: loopback only)")
	if err := flags.Parse(os.Args[1:]); err != nil {
		return err
	}
	// Arguments after "--" go to kube-apiserver as they are, after ours, so they win.
	extraArgs := flags.Args()

	// Build the apiserver command first: it installs the SIGTERM/SIGINT handler
	// and its context is cancelled by them, which is our single shutdown path.
	apiserver := app.NewAPIServerCommand()
	ctx := apiserver.Context()
	// If whoever reads our stdout/stderr goes away, a log write must fail
	// quietly, not kill us with SIGPIPE before etcd is closed.
	signal.Ignore(syscall.SIGPIPE)

	if *stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			fmt.Fprintln(os.Stderr, "controlplane: stdin closed, shutting down")
			_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		}()
	}

	if *dir == "" {
		tmp, err := os.MkdirTemp("", "tollgate-controlplane-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		*dir = tmp
	}
	absDir, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	certDir := filepath.Join(absDir, "pki")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return err
	}

	apiPort, err := freePort()
	if err != nil {
		return err
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	var extraIPs []net.IP
	if *nodeIP != "" {
		ip := net.ParseIP(*nodeIP)
		if ip == nil {
			return fmt.Errorf("--node-ip %q is not an IP address", *nodeIP)
		}
		extraIPs = append(extraIPs, ip)
	}
	caCert, adminCert, err := writePKI(certDir, extraIPs)
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}
	kubeconfig := filepath.Join(absDir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, certDir); err != nil {
		return err
	}

	etcd, etcdURL, err := startEtcd(filepath.Join(absDir, "etcd"))
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer func() {
		// etcd logs "server closed" errors from its listeners as it closes them.
		fmt.Fprintln(os.Stderr, "controlplane: closing etcd (errors about closed servers are expected)")
		etcd.Close()
	}()

	pki := func(name string) string { return filepath.Join(certDir, name) }
	args := []string{
		"--etcd-servers=" + etcdURL,
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir=" + certDir,
		"--tls-cert-file=" + pki("apiserver.crt"),
		"--tls-private-key-file=" + pki("apiserver.key"),
		"--client-ca-file=" + pki("ca.crt"),
		"--service-account-issuer=" + saIssuer,
		"--service-account-key-file=" + pki("sa.pub"),
		"--service-account-signing-key-file=" + pki("sa.key"),
		"--api-audiences=" + apiAudience,
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.0.0.0/24",
	}
	if *nodeIP == "" {
		args = append(args,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			// The default "lease" reconciler would publish 127.0.0.1 as the endpoint of
			// the kubernetes Service, which validation rejects (loopback), in a loop.
			"--endpoint-reconciler-type=none",
		)
	} else {
		// Pods reach the API server through the kubernetes Service, whose endpoint
		// is the node's address.
		args = append(args, "--bind-address=0.0.0.0", "--advertise-address="+*nodeIP)
	}
	args = append(args,
		fmt.Sprintf("--v=%d", *verbosity),
	)
	apiserver.SetArgs(append(args, extraArgs...))

	if ctx.Err() != nil {
		return nil // asked to stop while etcd was starting
	}
	go waitReady(ctx, server, caCert, adminCert, kubeconfig)

	start := time.Now()
	err = apiserver.Execute()
	klog.Flush()
	if err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	if ctx.Err() == nil {
		return errors.New("kube-apiserver stopped unexpectedly")
	}
	fmt.Fprintf(os.Stderr, "controlplane: kube-apiserver stopped (up %s)\n", time.Since(start).Round(time.Millisecond))
	return nil
}

// startEtcd runs a single-member etcd on two free loopback ports and returns its
// client URL once it serves.
func startEtcd(dataDir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	clientURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}

	cfg := embed.NewConfig()
	cfg.Dir = dataDir
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"}
	// Test data is disposable; skipping fsync makes every write much faster.
	cfg.UnsafeNoFsync = true

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, clientURL.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", err
	case <-time.After(time.Minute):
		e.Close()
		return nil, "", errors.New("etcd not ready after 1m")
	}
}

// waitReady polls /readyz as the admin user and prints the READY line once.
func waitReady(ctx context.Context, server string, ca *x509.Certificate, admin tls.Certificate, kubeconfig string) {
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      roots,
			Certificates: []tls.Certificate{admin},
		}},
	}
	start := time.Now()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		resp, err := client.Get(server + "/readyz")
		if err != nil {
			continue
		}
		_ = resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			fmt.Fprintf(os.Stderr, "controlplane: ready in %s\n", time.Since(start).Round(time.Millisecond))
			fmt.Printf("READY kubeconfig=%s server=%s\n", kubeconfig, server)
			return
		}
	}
}

// freePort asks the kernel for a free loopback port. Another process could take
// it before we bind it; on loopback in a test run that is rare enough.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// writePKI writes into dir:
//
//	ca.crt / ca.key              the CA that signs everything below and verifies client certs
//	apiserver.crt / .key         serving cert for 127.0.0.1, localhost and the in-cluster names
//	admin.crt / .key             client cert CN=tollgate-admin, O=system:masters
//	sa.key / sa.pub              RSA key pair that signs and verifies ServiceAccount tokens
//
// and returns the CA and admin certificates for the readiness probe.
// extraIPs are added to the serving certificate (the node address pods dial).
func writePKI(dir string, extraIPs []net.IP) (*x509.Certificate, tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "tollgate-e2e-ca"},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caCert, err := sign(caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	if err := writePEM(dir, "ca.crt", "CERTIFICATE", caCert.Raw); err != nil {
		return nil, tls.Certificate{}, err
	}
	if err := writeKey(dir, "ca.key", caKey); err != nil {
		return nil, tls.Certificate{}, err
	}

	serving := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: append([]net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.IPv4(10, 0, 0, 1)}, extraIPs...),
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
			"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	}
	if _, err := issue(dir, "apiserver", serving, caCert, caKey); err != nil {
		return nil, tls.Certificate{}, err
	}
	admin := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "tollgate-admin", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	adminCert, err := issue(dir, "admin", admin, caCert, caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}

	// RSA rather than ECDSA: RS256 is what every JWT/JWKS consumer accepts.
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	if err := writeKey(dir, "sa.key", saKey); err != nil {
		return nil, tls.Certificate{}, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	return caCert, adminCert, writePEM(dir, "sa.pub", "PUBLIC KEY", pub)
}

// issue makes a fresh P-256 key, signs tmpl with the CA and writes NAME.crt/NAME.key.
func issue(dir, name string, tmpl, ca *x509.Certificate, caKey crypto.Signer) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	cert, err := sign(tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := writePEM(dir, name+".crt", "CERTIFICATE", cert.Raw); err != nil {
		return tls.Certificate{}, err
	}
	if err := writeKey(dir, name+".key", key); err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}, nil
}

// sign fills in serial number and validity (from an hour ago, so clock skew
// does not matter, for a year) and signs.
func sign(tmpl, parent *x509.Certificate, pub, signer any) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// writeKey writes a private key as PKCS#8 ("PRIVATE KEY"), the form every TLS
// stack (Go, rustls, OpenSSL) reads.
func writeKey(dir, name string, key any) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(dir, name, "PRIVATE KEY", der)
}

func writePEM(dir, name, typ string, der []byte) error {
	return os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// writeKubeconfig writes an admin kubeconfig with the certificates embedded, so
// it stays valid when copied elsewhere.
func writeKubeconfig(path, server, certDir string) error {
	data := map[string]string{}
	for _, name := range []string{"ca.crt", "admin.crt", "admin.key"} {
		b, err := os.ReadFile(filepath.Join(certDir, name))
		if err != nil {
			return err
		}
		data[name] = base64.StdEncoding.EncodeToString(b)
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: tollgate-e2e
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: tollgate-e2e
  context:
    cluster: tollgate-e2e
    user: admin
    namespace: default
current-context: tollgate-e2e
`, server, data["ca.crt"], data["admin.crt"], data["admin.key"])
	return os.WriteFile(path, []byte(cfg), 0o600)
}
