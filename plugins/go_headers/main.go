// A Proxy-Wasm plugin in Go, built with the Go toolchain itself
// (GOOS=wasip1 GOARCH=wasm -buildmode=c-shared): the Go SDK's module cannot be fetched on the
// project's machines, so this plugin exports the ABI with //go:wasmexport and imports the host
// calls with //go:wasmimport, which exercises the same runtime start-up as any Go plugin
// (WASI's fd_prestat_get, clocks, poll_oneoff, random bytes).
//
// It logs each request, answers "pong" itself when the request's x-go-question header says
// "ping", answers the properties it reads when it says "props", and otherwise adds the request
// header x-go-plugin and lets it through.
package main

import (
	"encoding/binary"
	"strconv"
	"strings"
	"unsafe"
)

// Properties the "props" answer reports: strings, then 8-byte little-endian integers.
var (
	stringProps = []string{"request.path", "request.url_path", "request.host", "request.scheme",
		"request.method", "request.query", "request.useragent", "request.protocol", "source.address",
		"destination.address", "route_name", "cluster_name", "plugin_name", "plugin_root_id",
		"plugin_vm_id", "moltghost.agent", "upstream.address", "connection.tls_version",
		"connection.requested_server_name", "node.id", "metadata.filter_metadata.moltghost.agent"}
	intProps = []string{"request.size", "request.time", "source.port", "destination.port",
		"upstream.port", "connection.id"}
)

//go:wasmimport env proxy_log
func proxyLog(level uint32, ptr unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, keyPtr unsafe.Pointer, keySize uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeaderMapValue(mapType uint32, keyPtr unsafe.Pointer, keySize uint32, valuePtr unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_get_property
func proxyGetProperty(pathPtr unsafe.Pointer, pathSize uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(status uint32, detailsPtr unsafe.Pointer, detailsSize uint32, bodyPtr unsafe.Pointer, bodySize uint32, headersPtr unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

const requestHeaders = 0

// Memory the host asked for, kept reachable until the next callback has read it.
var held [][]byte

func main() {}

//go:wasmexport proxy_abi_version_0_2_1
func abiVersion() {}

//go:wasmexport proxy_on_memory_allocate
func onMemoryAllocate(size uint32) uint32 {
	buf := make([]byte, size)
	held = append(held, buf)
	return uint32(uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
}

//go:wasmexport proxy_on_context_create
func onContextCreate(contextID, rootContextID uint32) {}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(contextID, headers, endOfStream uint32) uint32 {
	held = held[:0]
	log("go plugin saw a request")
	question := header("x-go-question")
	if question == "ping" || question == "props" {
		body := []byte("pong")
		if question == "props" {
			body = []byte(props())
		}
		details := []byte("go_plugin_answered")
		empty := make([]byte, 4) // a map with no pairs
		proxySendLocalResponse(200, unsafe.Pointer(unsafe.SliceData(details)), uint32(len(details)),
			unsafe.Pointer(unsafe.SliceData(body)), uint32(len(body)),
			unsafe.Pointer(unsafe.SliceData(empty)), uint32(len(empty)), -1)
		return 1 // Pause: the local response ends the request
	}
	key, value := []byte("x-go-plugin"), []byte("1")
	proxyAddHeaderMapValue(requestHeaders, unsafe.Pointer(unsafe.SliceData(key)), uint32(len(key)),
		unsafe.Pointer(unsafe.SliceData(value)), uint32(len(value)))
	return 0 // Continue
}

func log(msg string) {
	b := []byte(msg)
	proxyLog(2, unsafe.Pointer(unsafe.SliceData(b)), uint32(len(b)))
}

func header(name string) string {
	key := []byte(name)
	var ptr, size uint32
	if proxyGetHeaderMapValue(requestHeaders, unsafe.Pointer(unsafe.SliceData(key)), uint32(len(key)),
		unsafe.Pointer(&ptr), unsafe.Pointer(&size)) != 0 || size == 0 {
		return ""
	}
	return string(unsafe.Slice((*byte)(unsafe.Pointer(uintptr(ptr))), size))
}

// props reads every property of stringProps and intProps, one "name=value" line each.
func props() string {
	var out strings.Builder
	for _, name := range stringProps {
		out.WriteString(name + "=" + string(property(name)) + "\n")
	}
	for _, name := range intProps {
		v := property(name)
		if len(v) != 8 {
			out.WriteString(name + "=?\n")
			continue
		}
		out.WriteString(name + "=" + strconv.FormatUint(binary.LittleEndian.Uint64(v), 10) + "\n")
	}
	return out.String()
}

// property reads a property by its dotted name, passed as Envoy's NUL-separated path.
func property(name string) []byte {
	path := []byte(strings.ReplaceAll(name, ".", "\x00"))
	var ptr, size uint32
	if proxyGetProperty(unsafe.Pointer(unsafe.SliceData(path)), uint32(len(path)),
		unsafe.Pointer(&ptr), unsafe.Pointer(&size)) != 0 || size == 0 {
		return nil
	}
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(uintptr(ptr))), size)...)
}
