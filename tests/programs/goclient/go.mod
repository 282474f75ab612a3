module ktrace.test/goclient

go 1.19
