"""A local stand-in for a SandboxFusion service: its ``POST /run_code`` request and response shapes,
running each program in a LocalSandbox. Listens on 127.0.0.1 at a port the system picks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trl_resets.sandbox import FINISHED, TIMEOUT, LocalSandbox


class StandIn:
    """``with StandIn(sandbox) as service:`` gives ``service.url``; ``service.requests`` holds the bodies
    received; ``service.failures`` is a list of HTTP statuses to answer the next requests with."""

    def __init__(self, sandbox: LocalSandbox):
        self.sandbox = sandbox
        self.requests: list[dict] = []
        self.failures: list[int] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: dict) -> tuple[int, dict]:
        """The status and body SandboxFusion would send for one request."""
        with self.lock:
            self.requests.append(request)
            if self.failures:
                return self.failures.pop(0), {"detail": "stand-in failure"}
        if not isinstance(request.get("code"), str) or "language" not in request:
            return 422, {"detail": [{"msg": "field required", "loc": ["body", "code" if "code" not in request
                                                                       else "language"]}]}
        if request["language"] != "python":
            return 200, {"status": "SandboxError", "message": f"unsupported language {request['language']}",
                         "compile_result": None, "run_result": None, "files": {}}
        result = self.sandbox.run(request["code"], request.get("stdin") or "", float(request.get("run_timeout", 10)))
        status = {FINISHED: "Finished", TIMEOUT: "TimeLimitExceeded"}.get(result.status, "Error")
        run = {"status": status, "execution_time": result.seconds, "return_code": result.exit_code,
               "stdout": result.stdout, "stderr": result.stderr}
        overall = "Success" if result.ok else ("SandboxError" if status == "Error" else "Failed")
        return 200, {"status": overall, "message": "", "compile_result": None, "run_result": run,
                     "executor_pod_name": None, "files": {}}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if self.path != "/run_code":
                    self.send_error(404)
                    return
                length = int(self.headers.get("Content-Length", 0))
                status, body = standin.answer(json.loads(self.rfile.read(length) or b"{}"))
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler
