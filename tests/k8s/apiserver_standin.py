#!/usr/bin/env python3
"""A STAND-IN for the Kubernetes apiserver, for kvgate's discovery tests.

No real apiserver can run on the test machines (docs/building-blocks.md section 3), so this
process speaks the apiserver's HTTP protocol for the few resources kvgate watches. It is a
stand-in, not an apiserver: it has no auth, admission, RBAC, defaulting, schema validation,
controllers or graceful deletion, and it does not run the EndpointSlice controller; tests
write EndpointSlices themselves.

What it does implement, the way the apiserver does:
  * discovery: /version, /api, /apis, /api/v1, /apis/<group>[/<version>], in both the legacy
    form and the aggregated form (apidiscovery.k8s.io/v2) that kubectl negotiates;
  * pods, endpoints, endpointslices (discovery.k8s.io/v1), inferencepools
    (inference.networking.k8s.io/v1) and events (events.k8s.io/v1), namespaced and across
    namespaces, plus the custom resources of every CustomResourceDefinition manifest given with
    --crd, under their own groups and versions (with the status subresource where the CRD
    declares it), as an apiserver serves an established CRD;
  * one global resourceVersion over every object (like etcd's revision), MVCC reads: paginated
    lists (limit/continue) stay consistent at the RV of their first page;
  * list and watch with labelSelector (=, ==, !=, in, notin, exists, !exists) and fieldSelector
    (metadata.name, metadata.namespace); a watch with a label selector turns an object that
    starts or stops matching into ADDED or DELETED, as the watch cache does;
  * chunked watch streams, allowWatchBookmarks (BOOKMARK events), timeoutSeconds,
    sendInitialEvents (streaming lists, with the k8s.io/initial-events-end bookmark);
  * compaction (POST /_ctl/compact): a watch or continue token older than the compaction
    point gets 410 Gone (an ERROR event holding an Expired Status, for watches);
    POST /_ctl/watches?paused=true|false holds event delivery on open watches, so a test can
    make a watch fall behind a compaction deterministically;
  * POST (create, generateName), GET, PUT (replace, with resourceVersion preconditions),
    PATCH (application/merge-patch+json), DELETE, and the status subresource, so kubectl and
    tests drive it through the real resource paths;
  * --state-file persists objects and the RV across restarts (etcd outlives an apiserver
    restart); after a restart, watches from an RV older than the boot RV get 410 Gone, as a
    fresh watch cache does.

Usage: apiserver_standin.py [--port N] [--state-file PATH] [--no-endpointslices]
       [--bookmark-interval SECONDS] [--crd CRD_MANIFEST ...]
It prints "stand-in apiserver listening on http://127.0.0.1:<port>" once it accepts requests.
"""

import argparse
import base64
import bisect
import copy
import datetime
import json
import os
import re
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SERVER_VERSION = {
    "major": "1",
    "minor": "33",
    "emulationMajor": "1",
    "emulationMinor": "33",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "32",
    "gitVersion": "v1.33.0-standin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}

AGGREGATED_DISCOVERY = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
READ_VERBS = ["get", "list", "watch"]
WRITE_VERBS = ["create", "delete", "patch", "update"]


class Resource:
    def __init__(self, group, version, plural, kind, singular, short_names, status_subresource):
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.singular = singular
        self.short_names = short_names
        self.status_subresource = status_subresource

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def stored_as(self):
        """The store key's first part: a plural is unique only within its group (v1 and v1alpha2
        InferencePools are different resources)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


ALL_RESOURCES = [
    Resource("", "v1", "pods", "Pod", "pod", ["po"], True),
    Resource("", "v1", "endpoints", "Endpoints", "endpoints", ["ep"], False),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", "endpointslice", [], False),
    Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool", "inferencepool", [], True),
    # Events written by controllers (kube-rs's Recorder posts these, and patches a repeat).
    Resource("events.k8s.io", "v1", "events", "Event", "event", [], False),
]


def crd_resources(path):
    """The resources a CustomResourceDefinition manifest defines, one per served version, the way
    the apiserver serves a CRD once it is established."""
    import yaml  # the test requirements' kubernetes-validate brings PyYAML

    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    out = []
    for crd in docs:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", False):
                continue
            out.append(Resource(spec["group"], version["name"], names["plural"], names["kind"],
                                names.get("singular", names["kind"].lower()), names.get("shortNames", []),
                                "status" in (version.get("subresources") or {})))
    return out


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self):
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


def expired(message):
    return ApiError(410, "Expired", message)


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# selectors

LABEL_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"


def split_requirements(selector):
    """Splits on commas that are not inside a set's parentheses."""
    parts, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced parentheses")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError("unbalanced parentheses")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(selector):
    """Returns a predicate over a labels dict, or raises ValueError like the apiserver's parser."""
    requirements = []
    for req in split_requirements(selector or ""):
        m = re.fullmatch(rf"({LABEL_KEY})\s+(in|notin)\s+\((.*)\)", req)
        if m:
            values = {v.strip() for v in m.group(4).split(",")}
            if values == {""}:
                raise ValueError("for 'in', 'notin' operators, values set can't be empty")
            for v in values:
                if not re.fullmatch(LABEL_VALUE, v):
                    raise ValueError(f"invalid label value: {v!r}")
            key, op = m.group(1), m.group(3)
            if op == "in":
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
            continue
        m = re.fullmatch(rf"({LABEL_KEY})\s*(==|=|!=)\s*({LABEL_VALUE})", req)
        if m:
            key, op, value = m.group(1), m.group(3), m.group(4)
            if op == "!=":
                requirements.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                requirements.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        m = re.fullmatch(rf"(!?)\s*({LABEL_KEY})", req)
        if m:
            key, negated = m.group(2), m.group(1) == "!"
            requirements.append(lambda labels, k=key, n=negated: (k in labels) != n)
            continue
        raise ValueError(f"unable to parse requirement: {req!r}")
    return lambda labels: all(r(labels) for r in requirements)


def parse_field_selector(selector):
    requirements = []
    for req in split_requirements(selector or ""):
        m = re.fullmatch(r"([A-Za-z.]+)\s*(==|=|!=)\s*(.*)", req)
        if not m:
            raise ValueError(f"invalid field selector: {req!r}")
        field, op, value = m.group(1), m.group(2), m.group(3)
        if field not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {field}")
        attr = field.split(".", 1)[1]
        if op == "!=":
            requirements.append(lambda meta, a=attr, v=value: meta.get(a, "") != v)
        else:
            requirements.append(lambda meta, a=attr, v=value: meta.get(a, "") == v)
    return lambda meta: all(r(meta) for r in requirements)


class Filter:
    def __init__(self, resource, namespace, label_selector, field_selector):
        self.resource = resource
        self.namespace = namespace
        try:
            self.labels = parse_label_selector(label_selector)
            self.fields = parse_field_selector(field_selector)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"unable to parse selector: {e}")

    def matches(self, key, obj):
        if obj is None or key[0] != self.resource.stored_as:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(meta)


# ---------------------------------------------------------------------------------------------
# the store: current objects, the event log since the compaction point, MVCC reads


class Store:
    def __init__(self, state_file):
        self.cond = threading.Condition()
        self.state_file = state_file
        self.rv = 0
        self.objects = {}  # (plural, namespace, name) -> object
        self.base = {}  # the objects as they were at the compaction point
        self.compacted = 0
        self.log = []  # (rv, key, type, object, previous object)
        self.log_rvs = []
        # Held watches deliver nothing (a slow or stalled watch connection); they still see
        # compaction, which is how a real watcher falls out of the window and gets 410 Gone.
        self.watches_paused = False
        if state_file and os.path.exists(state_file):
            with open(state_file) as f:
                state = json.load(f)
            self.rv = state["resourceVersion"]
            for entry in state["objects"]:
                self.objects[tuple(entry["key"])] = entry["object"]
            # A restarted apiserver's watch cache starts at the current revision.
            self.compacted = self.rv
            self.base = dict(self.objects)

    def persist(self):
        if not self.state_file:
            return
        state = {
            "resourceVersion": self.rv,
            "objects": [{"key": list(k), "object": o} for k, o in self.objects.items()],
        }
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    def record(self, key, event_type, obj, previous):
        """Appends one change under a fresh RV. Caller holds the lock."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if event_type == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.log.append((self.rv, key, event_type, obj, previous))
        self.log_rvs.append(self.rv)
        self.persist()
        self.cond.notify_all()
        return obj

    def compact(self):
        with self.cond:
            self.base = dict(self.objects)
            self.compacted = self.rv
            self.log.clear()
            self.log_rvs.clear()
            self.cond.notify_all()
            return self.rv

    def state_at(self, rv):
        """The objects as of `rv` (caller holds the lock); 410 if `rv` was compacted away."""
        if rv < self.compacted:
            raise expired(f"too old resource version: {rv} ({self.compacted})")
        state = dict(self.base)
        for entry_rv, key, event_type, obj, _ in self.log:
            if entry_rv > rv:
                break
            if event_type == "DELETED":
                state.pop(key, None)
            else:
                state[key] = obj
        return state

    def events_after(self, rv):
        start = bisect.bisect_right(self.log_rvs, rv)
        return self.log[start:]


# ---------------------------------------------------------------------------------------------
# HTTP


def resource_version_param(value, name="resourceVersion"):
    try:
        rv = int(value)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid {name}: {value!r}")
    if rv < 0:
        raise ApiError(400, "BadRequest", f"invalid {name}: {value!r}")
    return rv


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


class Route:
    def __init__(self, resource, namespace, name, subresource):
        self.resource = resource
        self.namespace = namespace
        self.name = name
        self.subresource = subresource


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvgate-apiserver-standin"

    # ----- plumbing

    def log_message(self, fmt, *args):
        sys.stderr.write("stand-in apiserver: %s\n" % (fmt % args))

    def send_json(self, code, body, content_type="application/json"):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_status(self, err):
        self.send_json(err.code, err.status())

    def read_body(self):
        try:
            return json.loads(self.body or b"null")
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"request body is not JSON: {e}")

    def query(self):
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}

    def dispatch(self, method):
        # Every body is consumed, used or not: leftover bytes would corrupt the next request
        # on this keep-alive connection (kubectl sends DeleteOptions with DELETE).
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length > 0 else b""
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path.startswith("/_ctl/"):
                return self.control(method, path)
            if method == "GET" and self.discovery(path):
                return
            route = self.route(path)
            if route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            getattr(self, "verb_" + method.lower())(route)
        except ApiError as e:
            self.send_error_status(e)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    # ----- discovery

    def resources(self):
        return self.server.resources

    def discovery(self, path):
        if path == "/version":
            self.send_json(200, SERVER_VERSION)
            return True
        aggregated = "as=APIGroupDiscoveryList" in (self.headers.get("Accept") or "")
        if path == "/api":
            if aggregated:
                self.send_json(200, self.aggregated(core=True), AGGREGATED_DISCOVERY)
            else:
                host = f"127.0.0.1:{self.server.server_address[1]}"
                self.send_json(200, {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
                })
            return True
        if path == "/apis":
            if aggregated:
                self.send_json(200, self.aggregated(core=False), AGGREGATED_DISCOVERY)
            else:
                self.send_json(200, {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [self.group_doc(g) for g in self.groups()],
                })
            return True
        if path == "/api/v1":
            self.send_json(200, self.resource_list("", "v1"))
            return True
        m = re.fullmatch(r"/apis/([^/]+)", path)
        if m and m.group(1) in self.groups():
            self.send_json(200, dict(self.group_doc(m.group(1)), kind="APIGroup", apiVersion="v1"))
            return True
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)", path)
        if m and (m.group(1), m.group(2)) in {(r.group, r.version) for r in self.resources()}:
            self.send_json(200, self.resource_list(m.group(1), m.group(2)))
            return True
        return False

    def groups(self):
        return sorted({r.group for r in self.resources() if r.group})

    def group_doc(self, group):
        versions = sorted({r.version for r in self.resources() if r.group == group})
        gv = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gv, "preferredVersion": gv[0]}

    def resource_list(self, group, version):
        entries = []
        for r in self.resources():
            if (r.group, r.version) != (group, version):
                continue
            entries.append({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": True,
                "kind": r.kind,
                "verbs": WRITE_VERBS + READ_VERBS,
                "shortNames": r.short_names,
            })
            if r.status_subresource:
                entries.append({
                    "name": f"{r.plural}/status",
                    "singularName": "",
                    "namespaced": True,
                    "kind": r.kind,
                    "verbs": ["get", "patch", "update"],
                })
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
                "resources": entries}

    def aggregated(self, core):
        items = []
        for group in ([""] if core else self.groups()):
            versions = []
            for version in sorted({r.version for r in self.resources() if r.group == group}):
                resources = []
                for r in self.resources():
                    if (r.group, r.version) != (group, version):
                        continue
                    entry = {
                        "resource": r.plural,
                        "responseKind": {"group": group, "version": version, "kind": r.kind},
                        "scope": "Namespaced",
                        "singularResource": r.singular,
                        "verbs": WRITE_VERBS + READ_VERBS,
                        "shortNames": r.short_names,
                    }
                    if r.status_subresource:
                        entry["subresources"] = [{
                            "subresource": "status",
                            "responseKind": {"group": group, "version": version, "kind": r.kind},
                            "verbs": ["get", "patch", "update"],
                        }]
                    resources.append(entry)
                versions.append({"version": version, "resources": resources, "freshness": "Current"})
            items.append({"metadata": {"name": group, "creationTimestamp": None}, "versions": versions})
        return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
                "items": items}

    # ----- routing

    def route(self, path):
        m = re.fullmatch(r"/api/v1(/.*)", path)
        if m:
            group, version, rest = "", "v1", m.group(1)
        else:
            m = re.fullmatch(r"/apis/([^/]+)/([^/]+)(/.*)", path)
            if not m:
                return None
            group, version, rest = m.group(1), m.group(2), m.group(3)
        m = re.fullmatch(r"(?:/namespaces/([^/]+))?/([^/]+)(?:/([^/]+))?(?:/([^/]+))?", rest)
        if not m:
            return None
        namespace, plural, name, subresource = m.groups()
        for r in self.resources():
            if (r.group, r.version, r.plural) == (group, version, plural):
                if subresource is not None and (subresource != "status" or not r.status_subresource):
                    return None
                if name is not None and namespace is None:
                    return None
                return Route(r, namespace, name, subresource)
        return None

    # ----- reads

    def verb_get(self, route):
        q = self.query()
        if route.name is not None:
            store = self.server.store
            with store.cond:
                obj = store.objects.get((route.resource.stored_as, route.namespace, route.name))
            if obj is None:
                raise self.not_found(route)
            return self.send_json(200, obj)
        flt = Filter(route.resource, route.namespace, q.get("labelSelector"), q.get("fieldSelector"))
        if q.get("watch") in ("true", "1"):
            return self.watch(route, flt, q)
        return self.list(route, flt, q)

    def list(self, route, flt, q):
        store = self.server.store
        limit = resource_version_param(q["limit"], "limit") if q.get("limit") else 0
        start_after = None
        with store.cond:
            if q.get("continue"):
                try:
                    token = json.loads(base64.urlsafe_b64decode(q["continue"]))
                    list_rv, start_after = int(token["rv"]), tuple(token["start"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError(400, "BadRequest", "invalid continue token")
                if list_rv < store.compacted:
                    raise expired("The provided continue parameter is too old to display a consistent list result. "
                                  "You can start a new list without the continue parameter, or use the continue "
                                  "token in this response to retrieve the remainder of the results.")
            elif q.get("resourceVersionMatch") == "Exact":
                list_rv = resource_version_param(q.get("resourceVersion", ""))
                if list_rv > store.rv:
                    raise ApiError(504, "Timeout", f"Too large resource version: {list_rv}, current: {store.rv}",
                                   {"causes": [{"reason": "ResourceVersionTooLarge",
                                                "message": "Too large resource version"}], "retryAfterSeconds": 1})
            else:
                list_rv = store.rv
            state = store.state_at(list_rv)
            keys = sorted(k for k, o in state.items() if flt.matches(k, o))
            if start_after is not None:
                keys = [k for k in keys if k > start_after]
            page, rest = (keys[:limit], keys[limit:]) if limit else (keys, [])
            items = [state[k] for k in page]
        metadata = {"resourceVersion": str(list_rv)}
        if rest:
            token = json.dumps({"rv": list_rv, "start": list(page[-1])}).encode()
            metadata["continue"] = base64.urlsafe_b64encode(token).decode()
            metadata["remainingItemCount"] = len(rest)
        self.send_json(200, {"kind": f"{route.resource.kind}List", "apiVersion": route.resource.api_version,
                             "metadata": metadata, "items": items})

    def watch(self, route, flt, q):
        store = self.server.store
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else 1800.0
        deadline = time.monotonic() + timeout
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        initial_events = q.get("sendInitialEvents") in ("true", "1")
        rv_param = q.get("resourceVersion", "")
        if initial_events and rv_param not in ("", "0"):
            raise ApiError(422, "Invalid", "sendInitialEvents is only supported with resourceVersion unset or \"0\"")

        with store.cond:
            if rv_param in ("", "0"):
                since = store.rv
                initial = [(k, o) for k, o in sorted(store.objects.items()) if flt.matches(k, o)]
            else:
                since = resource_version_param(rv_param)
                waited = time.monotonic() + 3.0
                while since > store.rv and time.monotonic() < waited:
                    store.cond.wait(timeout=max(0.0, waited - time.monotonic()))
                if since > store.rv:
                    raise ApiError(504, "Timeout", f"Too large resource version: {since}, current: {store.rv}",
                                   {"causes": [{"reason": "ResourceVersionTooLarge",
                                                "message": "Too large resource version"}], "retryAfterSeconds": 1})
                initial = []

        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _, obj in initial:
            self.write_event("ADDED", obj)
        if initial_events:
            self.write_event("BOOKMARK", self.bookmark(route, since, initial_end=True))
        self.wfile.flush()

        sent = since
        next_bookmark = time.monotonic() + self.server.bookmark_interval
        while True:
            with store.cond:
                while True:
                    now = time.monotonic()
                    if now >= deadline or sent < store.compacted:
                        break
                    if not store.watches_paused and (store.events_after(sent) or
                                                     (bookmarks and now >= next_bookmark)):
                        break
                    wake = min(deadline, next_bookmark) if bookmarks and not store.watches_paused else deadline
                    store.cond.wait(timeout=max(0.0, wake - now))
                if now >= deadline:
                    break
                if sent < store.compacted:
                    # The events this watch still owed are gone: the client must re-list.
                    status = expired(f"too old resource version: {sent} ({store.compacted})").status()
                    self.write_event("ERROR", status)
                    break
                pending = store.events_after(sent)
                current = store.rv
            for entry_rv, key, event_type, obj, previous in pending:
                sent = entry_rv
                translated = self.translate(flt, key, event_type, obj, previous)
                if translated:
                    self.write_event(translated, obj)
            if bookmarks and time.monotonic() >= next_bookmark:
                self.write_event("BOOKMARK", self.bookmark(route, current))
                sent = max(sent, current)
                next_bookmark = time.monotonic() + self.server.bookmark_interval
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    @staticmethod
    def translate(flt, key, event_type, obj, previous):
        """What a watcher with this filter sees: objects entering or leaving its selector are
        reported as ADDED or DELETED, the way the apiserver's watch cache reports them."""
        now = flt.matches(key, obj)
        before = previous is not None and flt.matches(key, previous)
        if event_type == "ADDED":
            return "ADDED" if now else None
        if event_type == "DELETED":
            return "DELETED" if now or before else None
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        if before:
            return "DELETED"
        return None

    @staticmethod
    def bookmark(route, rv, initial_end=False):
        metadata = {"resourceVersion": str(rv)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": route.resource.kind, "apiVersion": route.resource.api_version, "metadata": metadata}

    def write_event(self, event_type, obj):
        data = json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def not_found(self, route):
        group = route.resource.group
        resource = f"{route.resource.plural}.{group}" if group else route.resource.plural
        return ApiError(404, "NotFound", f"{resource} \"{route.name}\" not found",
                        {"name": route.name, "group": group, "kind": route.resource.plural})

    # ----- writes

    def check_object(self, route, obj):
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        r = route.resource
        if obj.get("kind", r.kind) != r.kind or obj.get("apiVersion", r.api_version) != r.api_version:
            raise ApiError(400, "BadRequest",
                           f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API "
                           f"version ({r.api_version}) or kind ({obj.get('kind')} vs {r.kind})")
        obj["kind"], obj["apiVersion"] = r.kind, r.api_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if meta.get("namespace", route.namespace) != route.namespace:
            raise ApiError(400, "BadRequest",
                           "the namespace of the provided object does not match the namespace sent on the request")
        meta["namespace"] = route.namespace
        return meta

    def verb_post(self, route):
        if route.name is not None or route.namespace is None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        obj = self.read_body()
        meta = self.check_object(route, obj)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        store = self.server.store
        key = (route.resource.stored_as, route.namespace, meta["name"])
        with store.cond:
            if key in store.objects:
                raise ApiError(409, "AlreadyExists",
                               f"{route.resource.plural} \"{meta['name']}\" already exists",
                               {"name": meta["name"], "group": route.resource.group, "kind": route.resource.plural})
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            meta["generation"] = 1
            meta.pop("resourceVersion", None)
            meta.pop("deletionTimestamp", None)
            created = store.record(key, "ADDED", obj, None)
        self.send_json(201, created)

    def replace(self, route, build):
        """Read-modify-write of one object under the lock; `build(current)` returns the new object."""
        if route.name is None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        store = self.server.store
        key = (route.resource.stored_as, route.namespace, route.name)
        with store.cond:
            current = store.objects.get(key)
            if current is None:
                raise self.not_found(route)
            obj = build(copy.deepcopy(current))
            meta = self.check_object(route, obj)
            if meta.get("name", route.name) != route.name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            wanted_rv = meta.get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict",
                               f"Operation cannot be fulfilled on {route.resource.plural} \"{route.name}\": the "
                               "object has been modified; please apply your changes to the latest version and try "
                               "again", {"name": route.name, "group": route.resource.group,
                                         "kind": route.resource.plural})
            if route.subresource == "status":
                obj = dict(current, status=obj.get("status"))
            else:
                obj["status"] = obj.get("status", current.get("status")) \
                    if not route.resource.status_subresource else current.get("status")
                if obj.get("status") is None:
                    obj.pop("status", None)
            meta = obj["metadata"] = dict(obj["metadata"])
            for immutable in ("uid", "creationTimestamp", "name", "namespace"):
                if immutable in current["metadata"]:
                    meta[immutable] = current["metadata"][immutable]
            spec_changed = {k: v for k, v in obj.items() if k not in ("metadata", "status")} != \
                {k: v for k, v in current.items() if k not in ("metadata", "status")}
            meta["generation"] = current["metadata"].get("generation", 1) + (1 if spec_changed else 0)
            if self.comparable(obj) == self.comparable(current):
                return self.send_json(200, current)
            updated = store.record(key, "MODIFIED", obj, current)
        self.send_json(200, updated)

    @staticmethod
    def comparable(obj):
        """An object without the fields the server maintains, to tell a no-op write."""
        meta = {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "generation")}
        return dict(obj, metadata=meta)

    def verb_put(self, route):
        body = self.read_body()
        self.replace(route, lambda current: body)

    def verb_patch(self, route):
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != "application/merge-patch+json":
            raise ApiError(415, "UnsupportedMediaType",
                           f"the stand-in apiserver supports only application/merge-patch+json, not {content_type!r}")
        patch = self.read_body()
        self.replace(route, lambda current: merge_patch(current, patch))

    def verb_delete(self, route):
        if route.name is None or route.subresource is not None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        store = self.server.store
        key = (route.resource.stored_as, route.namespace, route.name)
        with store.cond:
            current = store.objects.get(key)
            if current is None:
                raise self.not_found(route)
            gone = copy.deepcopy(current)
            deleted = store.record(key, "DELETED", gone, current)
        self.send_json(200, deleted)

    # ----- control API (not part of the Kubernetes API)

    def control(self, method, path):
        if method == "POST" and path == "/_ctl/compact":
            rv = self.server.store.compact()
            return self.send_json(200, {"compactedResourceVersion": str(rv)})
        if method == "POST" and path == "/_ctl/watches":
            store = self.server.store
            with store.cond:
                store.watches_paused = self.query().get("paused") == "true"
                store.cond.notify_all()
                return self.send_json(200, {"paused": store.watches_paused})
        if method == "GET" and path == "/_ctl/state":
            store = self.server.store
            with store.cond:
                return self.send_json(200, {"resourceVersion": str(store.rv), "compacted": str(store.compacted)})
        raise ApiError(404, "NotFound", f"no control endpoint {method} {path}")


class StandinServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    parser = argparse.ArgumentParser(description="stand-in Kubernetes apiserver for kvgate tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state-file")
    parser.add_argument("--no-endpointslices", action="store_true",
                        help="do not serve discovery.k8s.io (an apiserver without EndpointSlices)")
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    parser.add_argument("--crd", action="append", default=[],
                        help="serve the custom resources a CustomResourceDefinition manifest defines")
    args = parser.parse_args()

    server = StandinServer(("127.0.0.1", args.port), Handler)
    server.store = Store(args.state_file)
    server.bookmark_interval = args.bookmark_interval
    server.resources = [r for r in ALL_RESOURCES
                        if not (args.no_endpointslices and r.group == "discovery.k8s.io")]
    for path in args.crd:
        server.resources.extend(crd_resources(path))
    print(f"stand-in apiserver listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
