"""The browser editor (app.py) under load: concurrent clients, malformed calls, what it exposes.

    python bench/bench_editor_load.py [--model M] [--clients 8,32,8] [--renders 20] [--steps 20] [--compile] [--json F]

Starts `python app.py --model M --port P` as a user does (with --no-compile unless --compile,
whose compile runs in the background while the page is served; and --threads 1), waits until its
page answers, then:

1. Load: for each client count N, N clients (`gradio_client.Client`, each its own session, each
   in its own thread) ask for R renders each, one after another as a person pressing Render
   does, of a prompt of their own (the red word's weight and the seed change per render), and
   after each render fetch its downloads (the files the page offers). Per round: requests,
   answered, errors, a render's client-observed latency (p50, p95), renders/s, and whether the
   queue kept arrival order: Gradio's queue runs one render at a time (default_concurrency_limit=1)
   in the order they joined it, so no render may finish before one submitted more than
   ORDER_MARGIN s earlier (the margin covers the join's own trip, which threads on a busy core
   delay). Every answer must show the prompt its client sent. The server's resident memory
   (VmRSS of its /proc/PID/status) at start and after each round shows whether it stays flat.
2. Malformed calls (MALFORMED), sent as raw JSON to Gradio's REST API (`/gradio_api/call/...`)
   so that NaN and infinity go as they are: each must come back as an error (Gradio's error
   event, or the page's error message), no traceback through app.py may reach the server's log,
   and a normal render must follow.
3. Exposure: the socket the server listens on (127.0.0.1 by default; a connection to each of the
   machine's other addresses must fail), and file requests outside what the server wrote
   (`/file=/etc/passwd`, `/gradio_api/file=...`, `..`) must be refused while a download it wrote
   is served.

tests/test_app_load.py runs a small version (4 clients x 3 renders on the tiny model) with these
functions. Clients and server share the CPU: on 2 cores pin both to one (`taskset -c 0`) beside
a training run, and compare numbers from the same machine only.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "tests" / "assets" / "small-shapes"  # 16 px, the model tests/test_app.py serves
RENDER_API = "on_render"  # the Render button (and Enter in the prompt): app.py's on_render
SWAP_API = "on_swap"
WEIGHT_API = "lambda"  # the first word's weight slider, released
DOWNLOADS_API = "/on_downloads"  # the files of the session's last render, as the page fetches them
ORDER_MARGIN = 1.0  # s; client threads on a busy core stamp a submit up to a few hundred ms late
CALL_TIMEOUT = 600  # seconds a single call may take before it counts as hung


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    """The resident memory of process `pid` in MiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    start_seconds: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(model, compile: bool = False, threads: int | None = 1, timeout: float = 600, extra: tuple = ()):
    """`python app.py --model MODEL --port P` (its default host), until its page answers; yields
    a Server and stops it afterwards. Its output goes to a log file (Server.log)."""
    port = free_port()
    command = [sys.executable, str(REPO / "app.py"), "--model", str(model), "--port", str(port), *extra]
    command += [] if compile else ["--no-compile"]
    command += ["--threads", str(threads)] if threads else []
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    folder = tempfile.TemporaryDirectory(prefix="bench-editor-load-")
    log = Path(folder.name) / "app.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, port, log, 0.0)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}:\n{server.log_text()}")
            try:
                with urllib.request.urlopen(server.url + "/", timeout=5):
                    break
            except OSError:
                if time.perf_counter() - start > timeout:
                    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{server.log_text()}") from None
                time.sleep(0.2)
        server.start_seconds = time.perf_counter() - start
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        folder.cleanup()


# ---- the page's calls ------------------------------------------------------------------------
def render_data(prompt: str, seed: int = 0, steps: int = 20, step=0, guidance=3, images=1, sampler="euler") -> list:
    """The values of on_render's inputs, in order: prompt, step of the maps, weight mode, context,
    seed, sampler, steps, guidance, images (the session's last result is Gradio state, not sent)."""
    return [prompt, step, "attention", "fade", seed, sampler, steps, guidance, images]


def swap_data(source: str, edit: str, edit_steps=0.5, keep_layout="auto", seed: int = 0, steps: int = 20) -> list:
    return [source, edit, edit_steps, keep_layout, "attention", "fade", seed, "euler", steps, 3, 1]


def weight_data(prompt: str, weight, steps: int = 20) -> list:
    """The first word's slider: prompt, weight, step of the maps, then the settings."""
    return [prompt, weight, 0, "attention", "fade", 0, "euler", steps, 3, 1]


def rendered_prompt(html_text) -> str | None:
    """The prompt a result's HTML shows (its data-prompt), unescaped; None when it shows none."""
    found = re.search(r'class="result" data-prompt="([^"]*)"', str(html_text))
    return html.unescape(found.group(1)) if found else None


def shown_error(outputs) -> str | None:
    """The page's error message in a handler's outputs (the first visible `prompt-error` HTML)."""
    for output in outputs if isinstance(outputs, list) else [outputs]:
        if isinstance(output, dict) and output.get("visible") and "prompt-error" in str(output.get("value", "")):
            return html.unescape(re.sub(r"<[^>]+>", "", str(output["value"]))).strip()
    return None


def rest_call(url: str, api: str, data: list, timeout: float = CALL_TIMEOUT) -> tuple[str, object]:
    """Call `api` through Gradio's REST API with `data` as JSON (NaN and Infinity as Python's json
    writes them). Returns ("complete", outputs), ("error", message) or ("refused", HTTP status and
    body) when the call was not even queued."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{url}/gradio_api/call/{api}", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            event = json.loads(response.read())["event_id"]
    except urllib.error.HTTPError as error:
        return "refused", f"HTTP {error.code}: {error.read()[:200].decode(errors='replace')}"
    with urllib.request.urlopen(f"{url}/gradio_api/call/{api}/{event}", timeout=timeout) as response:
        text = response.read().decode()
    kind, payload = None, None
    for line in text.splitlines():  # server-sent events: "event: X" then "data: JSON"
        if line.startswith("event: "):
            kind = line.removeprefix("event: ").strip()
        elif line.startswith("data: ") and kind in ("complete", "error"):
            payload = json.loads(line.removeprefix("data: "))
    if kind == "error":
        message = payload.get("error") if isinstance(payload, dict) else payload
        return "error", message or "(Gradio's error without details: show_error is off)"
    return kind or "none", payload


# ---- 1. load ---------------------------------------------------------------------------------
def load_round(url: str, clients: int, renders: int, steps: int = 20, pid: int | None = None) -> dict:
    """`clients` gradio_client sessions, each asking for `renders` renders in turn (and each
    render's downloads), all at once. Returns the round's figures (see the module's docstring)."""
    from gradio_client import Client

    sessions = [Client(url + "/", verbose=False, download_files=False) for _ in range(clients)]
    records: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run(index: int, client) -> None:
        barrier.wait()
        for r in range(renders):
            weight = round(0.5 + 0.05 * ((index * renders + r) % 60), 2)
            prompt = f"a (red:{weight}) circle on the left"
            record = {"client": index, "render": r, "prompt": prompt, "error": None, "downloads_error": None}
            record["submitted"] = time.perf_counter()
            try:
                job = client.submit(
                    *render_data(prompt, seed=index * renders + r, steps=steps), api_name="/" + RENDER_API
                )
                outputs = job.result(timeout=CALL_TIMEOUT)
                record["done"] = time.perf_counter()
                message = shown_error(outputs)
                shown = rendered_prompt(outputs[1])
                if message:
                    record["error"] = message
                elif shown != prompt:
                    record["error"] = f"answer shows {shown!r}, not the prompt sent"
            except Exception as error:  # a failed request is a result here, not the end of the bench
                record["done"] = time.perf_counter()
                record["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            if record["error"] is None:
                try:
                    files = client.predict(api_name=DOWNLOADS_API)
                    if len(files) != 3:
                        record["downloads_error"] = f"{len(files)} files, not 3"
                except Exception as error:
                    record["downloads_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            with lock:
                records.append(record)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(sessions)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for client in sessions:
        client.close()

    return round_figures(records, clients, renders, seconds, pid)


def round_figures(records: list[dict], clients: int, renders: int, seconds: float, pid: int | None) -> dict:
    """A load round's figures from its requests' records (see the module's docstring)."""
    answered = [r for r in records if r["error"] is None]
    latencies = [r["done"] - r["submitted"] for r in answered]
    inversions, pairs = 0, 0
    for a in records:
        for b in records:
            if a["submitted"] + ORDER_MARGIN < b["submitted"]:
                pairs += 1
                inversions += b["done"] < a["done"]
    errors = [r["error"] for r in records if r["error"]] + [
        r["downloads_error"] for r in records if r["downloads_error"]
    ]
    return {
        "clients": clients,
        "renders per client": renders,
        "requests": clients * renders,
        "answered": len(answered),
        "errors": len(records) - len(answered),
        "download errors": sum(r["downloads_error"] is not None for r in records),
        "error examples": sorted(set(errors))[:5],
        "p50 s": round(statistics.median(latencies), 3) if latencies else None,
        "p95 s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "max s": round(max(latencies), 3) if latencies else None,
        "renders/s": round(len(answered) / seconds, 2),
        "seconds": round(seconds, 1),
        "queue order kept": inversions == 0,
        "order inversions": inversions,
        "order pairs checked": pairs,
        "rss after MiB": round(rss_mb(pid), 1) if pid else None,
    }


# ---- 2. malformed calls ----------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
PASSWD = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}


def _render(prompt="a red circle", **values) -> list:
    return render_data(prompt, **{"steps": 2, **values})


def _swap(source="a red circle", edit="a blue circle", **values) -> list:
    return swap_data(source, edit, **{"steps": 2, **values})


MALFORMED = [  # (what, api, data): each must be answered with an error
    ("steps as text", RENDER_API, _render(steps="abc")),
    ("seed as text", RENDER_API, _render(seed="x")),
    ("images as a list", RENDER_API, _render(images=[1])),
    ("too few values", RENDER_API, ["a red circle"]),
    ("too many values", RENDER_API, _render() + ["extra"] * 5),
    ("a file /etc/passwd as the prompt", RENDER_API, _render(PASSWD)),
    ("a file ../../etc/passwd as the prompt", RENDER_API, _render({**PASSWD, "path": "../../etc/passwd"})),
    ("sampler ../../etc/passwd", RENDER_API, _render(sampler="../../etc/passwd")),
    ("100 kB prompt", RENDER_API, _render("a red circle " * 7700)),
    ("100 kB prompt of brackets", RENDER_API, _render("(" * 100_000)),
    ("100 kB swap prompts", SWAP_API, _swap("a red circle " * 7700, "a blue circle " * 7700)),
    ("weight 1e30 in the prompt", RENDER_API, _render("a (red:1e30) circle")),
    ("weight NaN in the prompt", RENDER_API, _render("a (red:nan) circle")),
    ("weight inf in the prompt", RENDER_API, _render("a (red:inf) circle")),
    ("negative weight in the prompt", RENDER_API, _render("a (red:-1) circle")),
    ("slider weight 1e30", WEIGHT_API, weight_data("a red circle", 1e30, steps=2)),
    ("slider weight NaN", WEIGHT_API, weight_data("a red circle", NAN, steps=2)),
    ("steps -5", RENDER_API, _render(steps=-5)),
    ("steps 1e9", RENDER_API, _render(steps=1e9)),
    ("steps NaN", RENDER_API, _render(steps=NAN)),
    ("guidance NaN", RENDER_API, _render(guidance=NAN)),
    ("guidance 1e30", RENDER_API, _render(guidance=1e30)),
    ("seed -1", RENDER_API, _render(seed=-1)),
    ("seed 1e30", RENDER_API, _render(seed=1e30)),
    ("seed 2**70", RENDER_API, _render(seed=2**70)),
    ("seed NaN", RENDER_API, _render(seed=NAN)),
    ("seed infinity", RENDER_API, _render(seed=INF)),
    ("images NaN", RENDER_API, _render(images=NAN)),
    ("images 99", RENDER_API, _render(images=99)),
    ("step of the maps NaN", RENDER_API, _render(step=NAN)),
    ("edit steps NaN", SWAP_API, _swap(edit_steps=NAN)),
    ("edit steps 1e30", SWAP_API, _swap(edit_steps=1e30)),
    ("keep layout ../x", SWAP_API, _swap(keep_layout="../x")),
    ("swap seed 1e30", SWAP_API, _swap(seed=1e30)),
]


def app_tracebacks(log: str) -> int:
    """Tracebacks in a server log that pass through app.py: a handler raised what it should have
    answered with a message (Gradio's own input checks log tracebacks of their own, which stop
    in gradio/)."""
    return sum(' File "' in block and "app.py" in block for block in log.split("Traceback (most recent call last)")[1:])


def malformed_calls(server: Server, steps: int = 2) -> dict:
    """Each of MALFORMED, then a normal render. Returns per call: the outcome ("error": Gradio's
    error event; "error message": the page's error; "refused": not queued; anything else fails),
    the message, the seconds, and whether a traceback through app.py reached the log."""
    cases = []
    for what, api, data in MALFORMED:
        before = app_tracebacks(server.log_text())
        start = time.perf_counter()
        try:
            kind, payload = rest_call(server.url, api, data)
        except Exception as error:
            kind, payload = "failed", f"{type(error).__name__}: {error}"
        seconds = time.perf_counter() - start
        if kind == "complete":
            message = shown_error(payload)
            kind, payload = ("error message", message) if message else ("answered without an error", str(payload)[:200])
        cases.append(
            {
                "call": what,
                "api": "/" + api,
                "outcome": kind,
                "message": str(payload)[:300],
                "seconds": round(seconds, 3),
                "app.py traceback": app_tracebacks(server.log_text()) > before,
            }
        )
    kind, payload = rest_call(server.url, RENDER_API, render_data("a blue square on the right", steps=steps))
    serves = kind == "complete" and rendered_prompt(payload[1]) == "a blue square on the right"
    return {
        "calls": cases,
        "answered with an error": sum(c["outcome"] in ("error", "error message", "refused") for c in cases),
        "app.py tracebacks": sum(c["app.py traceback"] for c in cases),
        "renders afterwards": serves,
        "server alive": server.process.poll() is None,
    }


# ---- 3. exposure -----------------------------------------------------------------------------
def other_addresses() -> list[str]:
    """This machine's IPv4 and IPv6 addresses other than loopback."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                ip = address.address.split("%")[0]
                if not ip.startswith("127.") and ip != "::1" and not ip.startswith("fe80"):
                    found.append(ip)
    return found


def binding(server: Server) -> dict:
    """The addresses the server listens on (psutil), and whether a connection to its port on each
    of the machine's other addresses gets through."""
    import psutil

    listening = sorted(
        {
            f"{c.laddr.ip}:{c.laddr.port}"
            for c in psutil.Process(server.process.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
    )
    reached = {}
    for ip in other_addresses():
        try:
            with socket.create_connection((ip, server.port), timeout=3):
                reached[ip] = True
        except OSError:
            reached[ip] = False
    return {
        "listening": listening,
        "loopback only": bool(listening) and all(a.split(":")[0] == "127.0.0.1" for a in listening),
        "reached from other addresses": reached,
    }


PASSWD_FILE, APP_FILE, MODEL_FILE = Path("/etc/passwd"), REPO / "app.py", DEFAULT_MODEL / "model_index.json"
FILE_REQUESTS = [  # (path of the request, the file it aims at)
    ("/file=/etc/passwd", PASSWD_FILE),
    ("/gradio_api/file=/etc/passwd", PASSWD_FILE),
    ("/gradio_api/file=../../etc/passwd", PASSWD_FILE),
    ("/gradio_api/file=%2Fetc%2Fpasswd", PASSWD_FILE),
    ("/gradio_api/file=/tmp/gradio/../../etc/passwd", PASSWD_FILE),
    ("/gradio_api/file=/tmp/gradio/..%2F..%2Fetc%2Fpasswd", PASSWD_FILE),
    ("/file=..%2F..%2Fetc%2Fpasswd", PASSWD_FILE),
    ("/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", PASSWD_FILE),
    ("/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd", PASSWD_FILE),
    ("/gradio_api/file=app.py", APP_FILE),
    ("/gradio_api/file=" + str(APP_FILE), APP_FILE),
    ("/gradio_api/file=tests/assets/small-shapes/model_index.json", MODEL_FILE),
]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def file_requests(server: Server) -> dict:
    """FILE_REQUESTS (each must be refused: no 200 with the file), and one file the server wrote
    (a download of a render, which must be served)."""
    refused = {}
    for path, target in FILE_REQUESTS:
        status, body = get(server.url + path)
        refused[path] = status != 200 or target.read_bytes()[:200] not in body
    from gradio_client import Client

    client = Client(server.url + "/", verbose=False, download_files=False)
    client.predict(*render_data("a red circle", steps=2), api_name="/" + RENDER_API)
    files = client.predict(api_name=DOWNLOADS_API)
    client.close()
    status, body = get(files[0]["url"])
    return {
        "refused": refused,
        "all refused": all(refused.values()),
        "a download it wrote is served": status == 200 and body.startswith(b"\x89PNG"),
    }


# ---- the bench -------------------------------------------------------------------------------
def checks(server: Server) -> tuple[dict, dict, dict]:
    """Parts 2 and 3 on `server`, printed: the malformed calls, the binding, the file requests."""
    malformed = malformed_calls(server)
    for case in malformed["calls"]:
        print(f"  {case['call']:<40} {case['outcome']:<14} {case['seconds']:6.2f} s  {case['message'][:70]}")
    print(
        f"malformed calls: {malformed['answered with an error']} of {len(malformed['calls'])} answered with an "
        f"error, {malformed['app.py tracebacks']} tracebacks through app.py, a normal render afterwards: "
        f"{malformed['renders afterwards']}"
    )
    bound = binding(server)
    print(
        f"listening on {', '.join(bound['listening'])}; reached from other addresses: "
        f"{bound['reached from other addresses']}"
    )
    files = file_requests(server)
    print(
        f"file requests outside what it wrote refused: {sum(files['refused'].values())} of "
        f"{len(files['refused'])}; a download it wrote is served: {files['a download it wrote is served']}"
    )
    return malformed, bound, files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL.relative_to(REPO)))
    parser.add_argument(
        "--clients",
        default="8,32,8",
        help="client counts, one round each (default 8,32,8: the last round, new sessions past the "
        "server's 32 kept ones, shows whether memory levels off)",
    )
    parser.add_argument("--renders", type=int, default=20, help="renders per client (default 20)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per render (default 20, the page's)")
    parser.add_argument("--threads", type=int, default=1, help="app.py --threads (default 1)")
    parser.add_argument(
        "--compile", action="store_true", help="let app.py compile its UNet (in the background, a minute or more)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]

    with serve(args.model, compile=args.compile, threads=args.threads) as server:
        pid = server.process.pid
        print(f"app.py answered after {server.start_seconds:.1f} s (pid {pid}, port {server.port})")
        rest_call(server.url, RENDER_API, render_data("a red circle", steps=args.steps))  # one render first
        rss_start = rss_mb(pid)
        rounds = []
        print(
            f"{'clients':>7} {'requests':>8} {'answered':>8} {'errors':>6} {'p50 s':>7} {'p95 s':>7} "
            f"{'renders/s':>9} {'order':>5} {'RSS MiB':>8}"
        )
        print(f"{'start':>7} {'':>8} {'':>8} {'':>6} {'':>7} {'':>7} {'':>9} {'':>5} {rss_start:8.1f}")
        for clients in counts:
            figures = load_round(server.url, clients, args.renders, args.steps, pid)
            rounds.append(figures)
            print(
                f"{clients:7d} {figures['requests']:8d} {figures['answered']:8d} {figures['errors']:6d} "
                f"{figures['p50 s'] or float('nan'):7.3f} {figures['p95 s'] or float('nan'):7.3f} "
                f"{figures['renders/s']:9.2f} {'kept' if figures['queue order kept'] else 'BROKEN':>5} "
                f"{figures['rss after MiB']:8.1f}"
            )
            for example in figures["error examples"]:
                print(f"        error: {example}")
        malformed, bound, files = checks(server)
        rss_end = rss_mb(pid)

    if args.json:
        import torch

        record = {
            "model": args.model,
            "parameters": {
                "clients": counts,
                "renders per client": args.renders,
                "steps": args.steps,
                "guidance": 3,
                "sampler": "euler",
                "images": 1,
                "app.py": f"--threads {args.threads}" + ("" if args.compile else " --no-compile"),
            },
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}; clients and server share this CPU "
            f"(affinity {sorted(os.sched_getaffinity(0))})",
            "start-up s": round(server.start_seconds, 1),
            "rss start MiB": round(rss_start, 1),
            "rss end MiB": round(rss_end, 1),
            "rounds": rounds,
            "queue order checked": f"no render finished before one submitted more than {ORDER_MARGIN} s earlier "
            "(client-side submit and completion times, every pair of a round)",
            "malformed": malformed,
            "binding": bound,
            "files": files,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
