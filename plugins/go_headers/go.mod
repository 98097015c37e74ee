module moltghost.dev/plugins/go_headers

go 1.26
