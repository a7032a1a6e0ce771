#!/usr/bin/env python3
"""OTLP profiles receiver for the integration tests: gRPC (ProfilesService/Export) and HTTP
(POST /v1development/profiles), decoding with opentelemetry-proto 1.45.2, which speaks proto
v1.10 (older versions decode v1.10 samples wrongly without any error).

Each request becomes one JSON line (in --out, or on stdout) with what the tests assert on:
resources and their attributes, profiles' sample and period types, the link table, per-leaf
tick counts by trace, functions, attributes, and the violations of the dictionary rules the
SIG's conformance checker enforces ("errors"; empty when the request is well formed).

It prints "grpc_port N", "http_port N", then "ready <pid>" once both servers listen.
--refuse answers every request with UNAVAILABLE / 503; --reject-profiles N reports N
rejected profiles in partial_success.

Run from the venv the tests create: target/otlp-venv/bin/python receiver.py ...
"""

import argparse
import gzip
import http.server
import json
import os
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2 as service_pb2,
    profiles_service_pb2_grpc as service_grpc,
)
from opentelemetry.proto.profiles.v1development import profiles_pb2

HTTP_PATH = "/v1development/profiles"

_write_lock = threading.Lock()


def any_value(v):
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        return v.double_value
    return {"unsupported": kind}


def summarize(req):
    """What the tests assert on, plus every rule violation found."""
    errors = []
    d = req.dictionary
    if not req.HasField("dictionary"):
        errors.append("no dictionary")
    tables = {
        "string_table": d.string_table,
        "mapping_table": d.mapping_table,
        "location_table": d.location_table,
        "function_table": d.function_table,
        "link_table": d.link_table,
        "attribute_table": d.attribute_table,
        "stack_table": d.stack_table,
    }
    for name, table in tables.items():
        if len(table) == 0:
            errors.append(f"{name} is empty (index 0 must hold the zero value)")
            continue
        zero = table[0]
        if name == "string_table":
            if zero != "":
                errors.append("string_table[0] is not empty")
        elif zero != type(zero)():
            errors.append(f"{name}[0] is not the zero value: {zero}")

    def check(index, table, what):
        if not 0 <= index < len(tables[table]):
            errors.append(f"{what}: index {index} outside {table} ({len(tables[table])})")
            return False
        return True

    def s(i):
        return d.string_table[i] if 0 <= i < len(d.string_table) else f"<bad {i}>"

    for i, link in enumerate(d.link_table[1:], 1):
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            errors.append(f"link {i}: {len(link.trace_id)}/{len(link.span_id)} bytes")
    for i, fn in enumerate(d.function_table[1:], 1):
        if not (fn.name_strindex or fn.system_name_strindex or fn.filename_strindex):
            errors.append(f"function {i} has no name")
        for f in (fn.name_strindex, fn.system_name_strindex, fn.filename_strindex):
            check(f, "string_table", f"function {i}")
    for i, m in enumerate(d.mapping_table[1:], 1):
        if not (m.memory_start < m.memory_limit or m.memory_start == m.memory_limit == 0):
            errors.append(f"mapping {i}: memory_start >= memory_limit")
        check(m.filename_strindex, "string_table", f"mapping {i}")
        for a in m.attribute_indices:
            check(a, "attribute_table", f"mapping {i}")
    for i, loc in enumerate(d.location_table[1:], 1):
        check(loc.mapping_index, "mapping_table", f"location {i}")
        for line in loc.lines:
            check(line.function_index, "function_table", f"location {i}")
        for a in loc.attribute_indices:
            check(a, "attribute_table", f"location {i}")
    for i, st in enumerate(d.stack_table[1:], 1):
        for l in st.location_indices:
            check(l, "location_table", f"stack {i}")
    for i, kv in enumerate(d.attribute_table[1:], 1):
        check(kv.key_strindex, "string_table", f"attribute {i}")
        if kv.value.WhichOneof("value") == "string_value_strindex":
            errors.append(f"attribute {i}: reference-based value (not inline)")

    def attr(i):
        kv = d.attribute_table[i]
        return s(kv.key_strindex), any_value(kv.value)

    def leaf_function(stack_index):
        st = d.stack_table[stack_index]
        if not st.location_indices:
            return ""
        loc = d.location_table[st.location_indices[0]]
        if not loc.lines:
            return ""
        return s(d.function_table[loc.lines[0].function_index].name_strindex)

    resources = []
    links = {}
    leaf_traces = {}
    sample_attribute_keys = set()
    thread_names = set()
    ticks_total = 0
    for rp in req.resource_profiles:
        attributes = {}
        for kv in rp.resource.attributes:
            if kv.key_strindex or not kv.key:
                errors.append(f"resource attribute {kv}: key not inline")
            if kv.value.WhichOneof("value") == "string_value_strindex":
                errors.append(f"resource attribute {kv.key}: value not inline")
            attributes[kv.key] = any_value(kv.value)
        profiles = []
        pid = attributes.get("process.pid")
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                shapes = set()
                ticks = 0
                start, end = p.time_unix_nano, p.time_unix_nano + p.duration_nano
                for n, sample in enumerate(p.samples):
                    what = f"pid {pid} sample {n}"
                    ok = check(sample.stack_index, "stack_table", what)
                    check(sample.link_index, "link_table", what)
                    keys = []
                    for a in sample.attribute_indices:
                        if check(a, "attribute_table", what):
                            key, value = attr(a)
                            keys.append(key)
                            if key == "thread.name":
                                thread_names.add(value)
                    if len(keys) != len(set(keys)):
                        errors.append(f"{what}: duplicate attribute keys {keys}")
                    sample_attribute_keys.update(keys)
                    shapes.add((bool(sample.values), bool(sample.timestamps_unix_nano)))
                    if sample.values and sample.timestamps_unix_nano and len(sample.values) != len(
                        sample.timestamps_unix_nano
                    ):
                        errors.append(f"{what}: values and timestamps differ in length")
                    for t in sample.timestamps_unix_nano:
                        if not start <= t < end:
                            errors.append(f"{what}: timestamp {t} outside [{start}, {end})")
                    count = len(sample.timestamps_unix_nano) or sum(sample.values)
                    ticks += count
                    trace = ""
                    if 0 < sample.link_index < len(d.link_table):
                        link = d.link_table[sample.link_index]
                        trace = link.trace_id.hex()
                        key = f"{trace}:{link.span_id.hex()}"
                        links[key] = links.get(key, 0) + count
                    if ok:
                        leaf = leaf_function(sample.stack_index)
                        per = leaf_traces.setdefault(f"{pid}:{leaf}", {})
                        per[trace] = per.get(trace, 0) + count
                if len(shapes) > 1:
                    errors.append(f"pid {pid}: samples of several shapes {shapes}")
                ticks_total += ticks
                profiles.append(
                    {
                        "sample_type": f"{s(p.sample_type.type_strindex)}/{s(p.sample_type.unit_strindex)}",
                        "period_type": f"{s(p.period_type.type_strindex)}/{s(p.period_type.unit_strindex)}",
                        "period": p.period,
                        "samples": len(p.samples),
                        "ticks": ticks,
                        "time_unix_nano": p.time_unix_nano,
                        "duration_nano": p.duration_nano,
                        "scope": sp.scope.name,
                    }
                )
        resources.append({"attributes": attributes, "profiles": profiles})
    mapping_attributes = {}
    for m in d.mapping_table[1:]:
        for a in m.attribute_indices:
            if 0 < a < len(d.attribute_table):
                key, value = attr(a)
                mapping_attributes.setdefault(s(m.filename_strindex), {})[key] = value
    return {
        "encoded_bytes": req.ByteSize(),
        "resources": resources,
        "ticks": ticks_total,
        "links": links,
        "leaf_traces": leaf_traces,
        "functions": sorted({s(f.name_strindex) for f in d.function_table[1:]}),
        "sample_attribute_keys": sorted(sample_attribute_keys),
        "thread_names": sorted(thread_names),
        "mapping_attributes": mapping_attributes,
        "table_sizes": {name: len(t) for name, t in tables.items()},
        "errors": errors,
    }


class Output:
    def __init__(self, path):
        self.file = open(path, "a", buffering=1) if path else sys.stdout

    def write(self, record):
        with _write_lock:
            self.file.write(json.dumps(record, sort_keys=True) + "\n")
            self.file.flush()


def response(args):
    r = service_pb2.ExportProfilesServiceResponse()
    if args.reject_profiles:
        r.partial_success.rejected_profiles = args.reject_profiles
        r.partial_success.error_message = "rejected by the test receiver"
    return r


class Service(service_grpc.ProfilesServiceServicer):
    def __init__(self, args, out):
        self.args, self.out = args, out

    def Export(self, request, context):
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        record = summarize(request)
        record.update(
            transport="grpc",
            refused=self.args.refuse,
            headers={k: metadata[k] for k in ("authorization", "x-tenant") if k in metadata},
            compression=metadata.get("grpc-encoding", "identity"),
        )
        self.out.write(record)
        if self.args.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the test receiver refuses")
        return response(self.args)


def http_handler(args, out):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def reply(self, status, body=b"", content_type="application/x-protobuf"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != HTTP_PATH:
                self.reply(404, b"unknown path", "text/plain")
                return
            encoding = self.headers.get("Content-Encoding", "identity")
            raw = gzip.decompress(body) if encoding == "gzip" else body
            try:
                request = service_pb2.ExportProfilesServiceRequest.FromString(raw)
            except Exception as e:  # a body that does not decode is the client's fault
                self.reply(400, str(e).encode(), "text/plain")
                return
            record = summarize(request)
            record.update(
                transport="http",
                refused=args.refuse,
                wire_bytes=len(body),
                compression=encoding,
                content_type=self.headers.get("Content-Type", ""),
                headers={
                    k: self.headers[k] for k in ("authorization", "x-tenant") if k in self.headers
                },
            )
            out.write(record)
            if args.refuse:
                self.reply(503, b"the test receiver refuses", "text/plain")
                return
            self.reply(200, response(args).SerializeToString())

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--out", help="append JSON lines here (default: stdout)")
    parser.add_argument("--refuse", action="store_true")
    parser.add_argument("--reject-profiles", type=int, default=0)
    args = parser.parse_args()
    out = Output(args.out)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_grpc.add_ProfilesServiceServicer_to_server(Service(args, out), server)
    grpc_port = server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    if grpc_port == 0:
        sys.exit(f"cannot listen on gRPC port {args.grpc_port}")
    server.start()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", args.http_port), http_handler(args, out))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    print(f"grpc_port {grpc_port}", flush=True)
    print(f"http_port {httpd.server_address[1]}", flush=True)
    print(f"ready {os.getpid()}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
