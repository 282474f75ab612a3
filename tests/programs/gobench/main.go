// gobench is the Go client scripts/bench-kube times: a static binary (CGO_ENABLED=0) with Go's
// own resolver and net/http, as most programs run under ktrace are. The same binary runs
// inside the hello pod (piped in with kubectl exec), under ktrace, and against a kubectl
// port-forward, so the three are compared on one client.
//
//	gobench newconn HOST PORT N   N GETs of http://HOST:PORT/, each on a new connection
//	                              (net/http, keep-alives off); HOST is resolved once, before timing
//	gobench lookup NAME N         N net.DefaultResolver.LookupHost(NAME) (A and AAAA, in parallel)
//
// Prints one JSON object like scripts/bench_kube_client.py's: "samples" in microseconds and, for
// newconn, "connect_samples" (the dial alone, from net/http/httptrace).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"strings"
	"time"
)

func micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

type result struct {
	Samples        []float64 `json:"samples"`
	ConnectSamples []float64 `json:"connect_samples,omitempty"`
}

func newconn(host, port string, n int) (result, error) {
	// The request figures time no lookup: the name is resolved once, as the Python client does.
	addrs, err := net.DefaultResolver.LookupHost(context.Background(), host)
	if err != nil {
		return result{}, err
	}
	ip := addrs[0]
	for _, a := range addrs {
		if !strings.Contains(a, ":") {
			ip = a
			break
		}
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	url := "http://" + net.JoinHostPort(ip, port) + "/"
	var out result
	for i := 0; i < n; i++ {
		var dialStart, dialDone time.Time
		trace := &httptrace.ClientTrace{
			ConnectStart: func(string, string) { dialStart = time.Now() },
			ConnectDone:  func(string, string, error) { dialDone = time.Now() },
		}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", url, nil)
		if err != nil {
			return result{}, err
		}
		req.Host = host
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return result{}, err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return result{}, err
		}
		if !strings.HasPrefix(string(body), "hello from") {
			return result{}, fmt.Errorf("unexpected answer %q", body)
		}
		out.Samples = append(out.Samples, micros(time.Since(start)))
		out.ConnectSamples = append(out.ConnectSamples, micros(dialDone.Sub(dialStart)))
	}
	return out, nil
}

func lookup(name string, n int) (result, error) {
	var out result
	for i := 0; i < n; i++ {
		start := time.Now()
		if _, err := net.DefaultResolver.LookupHost(context.Background(), name); err != nil {
			return result{}, err
		}
		out.Samples = append(out.Samples, micros(time.Since(start)))
	}
	return out, nil
}

func main() {
	args := os.Args[1:]
	var out result
	var err error
	switch {
	case len(args) == 4 && args[0] == "newconn":
		n, convErr := strconv.Atoi(args[3])
		if convErr != nil {
			err = convErr
			break
		}
		out, err = newconn(args[1], args[2], n)
	case len(args) == 3 && args[0] == "lookup":
		n, convErr := strconv.Atoi(args[2])
		if convErr != nil {
			err = convErr
			break
		}
		out, err = lookup(args[1], n)
	default:
		fmt.Fprintln(os.Stderr, "usage: gobench newconn HOST PORT N | gobench lookup NAME N")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobench:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
