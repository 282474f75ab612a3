module ktrace.test/gobench

go 1.19
