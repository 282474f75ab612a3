// goclient is a static Go fixture for ktrace's end-to-end tests (CGO_ENABLED=0, so it
// uses Go's own resolver and raw syscalls; no libc hook can see it).
//
//	goclient [-n N] [-c C] URL          N GETs, C at a time; "ok N/N <first body>" or "failed K/N <err>"
//	goclient -tcp HOST:PORT             one connect: "ok <remote> <local>" or "error <ERRNO>"
//	goclient -resolve NAME              "addrs <a> <b> ..." (sorted) or "error <msg>"
//	goclient -udp-local HOST:PORT       "what is my outbound IP": net.Dial("udp") (sends nothing),
//	                                    "local <ip> <port is not 0>" from LocalAddr(), or "error <ERRNO>"
//	goclient -spawn K [-n N] [-c C] URL K copies of itself via os/exec, with an empty environment
//	goclient -exec CMD [ARG...]         runs CMD via os/exec and exits with its status
//	goclient -stall HOST:PORT URL       the event-loop scenario: a ticker every 10 ms, a dial to
//	                                    HOST:PORT abandoned after 3 s, and 100 ms in, a GET of URL;
//	                                    "hello ok|<err> first", "stall TIMEOUT|<err>", "ticks N"
//	goclient -pause URL                 a GET ("first ok <body>"), "waiting <pid>", then a second GET
//	                                    once a line arrives on stdin ("second ok <body>"): a debugger
//	                                    attaches in between (tests/test_e2e_debuggers.py)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

var errnoNames = map[syscall.Errno]string{
	syscall.ECONNREFUSED:  "ECONNREFUSED",
	syscall.ETIMEDOUT:     "ETIMEDOUT",
	syscall.ENETUNREACH:   "ENETUNREACH",
	syscall.EHOSTUNREACH:  "EHOSTUNREACH",
	syscall.ECONNRESET:    "ECONNRESET",
	syscall.EADDRNOTAVAIL: "EADDRNOTAVAIL",
	syscall.EACCES:        "EACCES",
	syscall.EPERM:         "EPERM",
	syscall.ENOSYS:        "ENOSYS",
	syscall.EINVAL:        "EINVAL",
}

// outboundAddress is the common idiom for "which address do I reach the world from":
// connecting a UDP socket only picks the route and the source, no packet is sent.
func outboundAddress(target string) int {
	conn, err := net.Dial("udp", target)
	if err != nil {
		fmt.Println("error", errName(err))
		return 1
	}
	defer conn.Close()
	local := conn.LocalAddr().(*net.UDPAddr)
	fmt.Println("local", local.IP, local.Port != 0)
	return 0
}

func errName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if name, ok := errnoNames[errno]; ok {
			return name
		}
		return fmt.Sprintf("E%d", int(errno))
	}
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return "TIMEOUT"
	}
	return strings.ReplaceAll(err.Error(), "\n", " ")
}

func fetchAll(url string, n, c int) int {
	client := &http.Client{
		Timeout:   60 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: c, MaxConnsPerHost: c},
	}
	sem := make(chan struct{}, c)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var firstBody, firstErr string
	okCount := 0
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			body, err := get(client, url)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == "" {
					firstErr = errName(err)
				}
				return
			}
			okCount++
			if firstBody == "" {
				firstBody = strings.TrimSpace(body)
			}
		}()
	}
	wg.Wait()
	if okCount == n {
		fmt.Printf("ok %d/%d %s\n", okCount, n, firstBody)
		return 0
	}
	fmt.Printf("failed %d/%d %s\n", n-okCount, n, firstErr)
	return 1
}

func get(client *http.Client, url string) (string, error) {
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return gotResponse(url, resp.StatusCode, string(body)), nil
}

// gotResponse is the spot where the debugger tests stop (tests/test_e2e_debuggers.py, and the
// dlv walk-through in docs/debugging.md): every successful GET passes through it after the
// response is read, with the URL, the status and the body as its arguments and locals.
// noinline keeps it a function of its own, which a breakpoint names as main.gotResponse.
//
//go:noinline
func gotResponse(url string, status int, body string) string {
	reply := body
	return reply
}

// waitForLine reads stdin up to a newline with raw read(2) calls: the thread blocks in the
// kernel with main's frames on its stack, so a debugger's backtrace shows the program where it
// waits (os.Stdin would park the goroutine in the netpoller, off every thread's stack).
func waitForLine() error {
	buf := make([]byte, 1)
	for {
		n, err := syscall.Read(0, buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err != nil:
			return err
		case n == 0:
			return io.EOF
		case buf[0] == '\n':
			return nil
		}
	}
}

// pauseBetween makes two GETs with a wait for a line on stdin in between, so that a debugger
// can attach to a program already running (and already talking to the cluster). No keep-alive:
// the second GET resolves the name and connects anew, after the debugger came and went.
func pauseBetween(url string) int {
	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i, label := range []string{"first", "second"} {
		if i == 1 {
			fmt.Println("waiting", os.Getpid())
			if err := waitForLine(); err != nil {
				fmt.Println("error stdin", err)
				return 1
			}
		}
		body, err := get(client, url)
		if err != nil {
			fmt.Println(label, "error", errName(err))
			return 1
		}
		fmt.Println(label, "ok", strings.TrimSpace(body))
	}
	return 0
}

func dialOnce(addr string) int {
	conn, err := net.DialTimeout("tcp", addr, 60*time.Second)
	if err != nil {
		fmt.Printf("error %s\n", errName(err))
		return 1
	}
	defer conn.Close()
	fmt.Printf("ok %s %s\n", conn.RemoteAddr(), conn.LocalAddr())
	return 0
}

func resolve(name string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupHost(ctx, name)
	if err != nil {
		fmt.Printf("error %s\n", errName(err))
		return 1
	}
	sort.Strings(addrs)
	fmt.Printf("addrs %s\n", strings.Join(addrs, " "))
	return 0
}

func spawn(k, n, c int, url string) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Printf("error %s\n", err)
		return 1
	}
	codes := make([]int, k)
	outs := make([]string, k)
	var wg sync.WaitGroup
	for i := 0; i < k; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			cmd := exec.Command(self, "-n", fmt.Sprint(n), "-c", fmt.Sprint(c), url)
			cmd.Env = []string{} // children that clear their environment must still be followed
			out, err := cmd.Output()
			outs[i] = strings.TrimSpace(string(out))
			if err != nil {
				codes[i] = 1
			}
		}(i)
	}
	wg.Wait()
	failed := 0
	for i := 0; i < k; i++ {
		fmt.Printf("child %d: %s\n", i, outs[i])
		if codes[i] != 0 {
			failed++
		}
	}
	if failed > 0 {
		fmt.Printf("children failed %d/%d\n", failed, k)
		return 1
	}
	fmt.Printf("children ok %d/%d\n", k, k)
	return 0
}

func runCmd(argv []string) int {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err := cmd.Run()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		return exitErr.ExitCode()
	}
	if err != nil {
		fmt.Printf("error %s\n", errName(err))
		return 1
	}
	return 0
}

// stall is what an event loop does under a slow network: its other work (a ticker, a second
// request) goes on while one connect waits, and the waiting one is abandoned at its deadline.
func stall(blackhole, url string) int {
	start := time.Now()
	var mu sync.Mutex
	var order []string
	note := func(line string) {
		mu.Lock()
		defer mu.Unlock()
		order = append(order, line)
	}
	ticks := 0
	ticker := time.NewTicker(10 * time.Millisecond)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-ticker.C:
				mu.Lock()
				ticks++
				mu.Unlock()
			case <-done:
				return
			}
		}
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", blackhole)
		if err == nil {
			conn.Close()
			note("stall connected")
			return
		}
		note("stall " + errName(err))
	}()
	go func() {
		defer wg.Done()
		time.Sleep(100 * time.Millisecond)
		client := &http.Client{Timeout: 10 * time.Second}
		if _, err := get(client, url); err != nil {
			note("hello " + errName(err))
			return
		}
		note("hello ok")
	}()
	wg.Wait()
	close(done)
	ticker.Stop()
	for _, line := range order {
		fmt.Println(line)
	}
	mu.Lock()
	fmt.Println("ticks", ticks, "elapsed-s", int(time.Since(start).Seconds()))
	mu.Unlock()
	return 0
}

func main() {
	n := flag.Int("n", 1, "number of requests")
	c := flag.Int("c", 1, "concurrency")
	tcp := flag.String("tcp", "", "connect once to HOST:PORT")
	name := flag.String("resolve", "", "resolve NAME")
	udpLocal := flag.String("udp-local", "", "print the local address of a UDP socket dialled to HOST:PORT")
	k := flag.Int("spawn", 0, "run K copies of this program via os/exec")
	execMode := flag.Bool("exec", false, "run the remaining arguments as a command via os/exec")
	stalled := flag.String("stall", "", "the event-loop scenario with a dial to HOST:PORT that stalls")
	pause := flag.Bool("pause", false, "two GETs of URL with a wait for a line on stdin in between")
	flag.Parse()
	switch {
	case *pause && flag.NArg() == 1:
		os.Exit(pauseBetween(flag.Arg(0)))
	case *stalled != "" && flag.NArg() == 1:
		os.Exit(stall(*stalled, flag.Arg(0)))
	case *tcp != "":
		os.Exit(dialOnce(*tcp))
	case *name != "":
		os.Exit(resolve(*name))
	case *udpLocal != "":
		os.Exit(outboundAddress(*udpLocal))
	case *execMode && flag.NArg() > 0:
		os.Exit(runCmd(flag.Args()))
	case *k > 0 && flag.NArg() == 1:
		os.Exit(spawn(*k, *n, *c, flag.Arg(0)))
	case flag.NArg() == 1:
		os.Exit(fetchAll(flag.Arg(0), *n, *c))
	}
	fmt.Fprintln(os.Stderr, "usage: goclient [-n N] [-c C] URL | -tcp HOST:PORT | -resolve NAME | -spawn K URL | -exec CMD... | -pause URL")
	os.Exit(2)
}
