// Command vcsim runs the govmomi vSphere simulator for siterecovery's tests.
//
// It binds the address given by -listen (port 0 picks a free port), then
// prints one JSON line on stdout: {"url": ..., "cert_file": ..., "thumbprint": ...}
// and serves until stdin closes or it receives SIGTERM/SIGINT. Datastores
// are directories under $TMPDIR; they are removed on exit. Credentials come
// from VCSIM_USERNAME and VCSIM_PASSWORD (any non-empty pair when unset).
//
// Built offline against Debian's golang-github-vmware-govmomi-dev by
// deploy/build-vcsim.sh.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	mode := flag.String("mode", "vpx", "vpx (a vCenter) or esx (a standalone ESXi host)")
	listen := flag.String("listen", "127.0.0.1:0", "address to bind; port 0 picks a free port")
	edition := flag.String("edition", "", "licence edition key every host reports (default: the simulator's evaluation licence)")
	vms := flag.Int("vm", -1, "VMs per resource pool (default: the model's)")
	flag.Parse()

	var model *simulator.Model
	switch *mode {
	case "vpx":
		model = simulator.VPX()
	case "esx":
		model = simulator.ESX()
	default:
		log.Fatalf("unknown -mode %q: use vpx or esx", *mode)
	}
	if *vms >= 0 {
		model.Machine = *vms
	}
	if *edition != "" {
		simulator.EvalLicense.EditionKey = *edition
		simulator.EvalLicense.Name = *edition
	}
	if err := model.Create(); err != nil {
		log.Fatalf("creating the %s model: %v", *mode, err)
	}
	defer model.Remove()

	// The simulator's built-in certificate has a key too weak for a default
	// OpenSSL client, so serve a fresh self-signed P-256 one for loopback.
	cert, err := selfSigned()
	if err != nil {
		log.Fatalf("making a certificate: %v", err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen}
	if user := os.Getenv("VCSIM_USERNAME"); user != "" {
		model.Service.Listen.User = url.UserPassword(user, os.Getenv("VCSIM_PASSWORD"))
	}
	server := model.Service.NewServer()
	defer server.Close()

	certFile, err := server.CertificateFile()
	if err != nil {
		log.Fatalf("writing the certificate: %v", err)
	}
	sum := sha1.Sum(server.Certificate().Raw)
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	u := *server.URL
	u.User = nil
	line, _ := json.Marshal(map[string]string{
		"url":        u.String(),
		"cert_file":  certFile,
		"thumbprint": strings.Join(hexes, ":"),
	})
	fmt.Println(string(line))

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		done <- syscall.SIGTERM
	}()
	<-done
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	template := x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "vcsim"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
