// incluster: a client-go program as an operator would be, for the kube tests of issue 17.
//
//	incluster [-env NAME,...] [-file PATH] [-api]   print env values, a file, and what the API allows
//	incluster -read PATH                            print PATH's content each time a line arrives on stdin
//	incluster -serve                                block until SIGTERM (the Deployment's own process)
//
// The output is deterministic, so the same binary's output inside the pod (kubectl exec) and
// under ktrace can be compared byte for byte.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

const namespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

func main() {
	envNames := flag.String("env", "", "comma-separated variable names to print")
	file := flag.String("file", "", "a file to print")
	api := flag.Bool("api", false, "use rest.InClusterConfig: list configmaps and secrets")
	read := flag.String("read", "", "print this file's content at every line of stdin")
	serve := flag.Bool("serve", false, "block until SIGTERM")
	flag.Parse()

	if *serve {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		return
	}
	if *read != "" {
		lines := bufio.NewScanner(os.Stdin)
		for lines.Scan() {
			data, err := os.ReadFile(*read)
			if err != nil {
				fmt.Printf("error %v\n", err)
			} else {
				fmt.Printf("content %q\n", string(data))
			}
		}
		return
	}
	if *envNames != "" {
		for _, name := range strings.Split(*envNames, ",") {
			value, ok := os.LookupEnv(name)
			if ok {
				fmt.Printf("env %s=%q\n", name, value)
			} else {
				fmt.Printf("env %s unset\n", name)
			}
		}
	}
	if *file != "" {
		data, err := os.ReadFile(*file)
		if err != nil {
			fmt.Printf("file %s: error %v\n", *file, err)
		} else {
			fmt.Printf("file %s: %q\n", *file, string(data))
		}
	}
	if *api {
		if err := listThings(); err != nil {
			fmt.Printf("api: error %v\n", err)
			os.Exit(1)
		}
	}
}

func listThings() error {
	config, err := rest.InClusterConfig()
	if err != nil {
		return fmt.Errorf("in-cluster config: %w", err)
	}
	fmt.Printf("api: host %s\n", config.Host)
	clients, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	ns, err := os.ReadFile(namespaceFile)
	if err != nil {
		return err
	}
	namespace := strings.TrimSpace(string(ns))
	ctx := context.Background()
	configMaps, err := clients.CoreV1().ConfigMaps(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		fmt.Printf("configmaps: error %v\n", err)
	} else {
		names := []string{}
		for _, item := range configMaps.Items {
			names = append(names, item.Name)
		}
		sort.Strings(names)
		fmt.Printf("configmaps: %s\n", strings.Join(names, " "))
	}
	_, err = clients.CoreV1().Secrets(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		fmt.Printf("secrets: error %v\n", err)
	} else {
		fmt.Printf("secrets: listed (should have been forbidden)\n")
	}
	return nil
}
