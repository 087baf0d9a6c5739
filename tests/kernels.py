"""A real Jupyter kernel to drive from a test (jupyter_client: it starts, interrupts and
signals the kernel as JupyterLab does), and what each execution printed, displayed and raised."""

import queue
import re
import time

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Kernel:
    def __init__(self):
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", startup_timeout=60)

    def send(self, code: str) -> str:
        """Queue ``code`` for execution (as "Run All" queues cells); returns its msg_id."""
        return self.kc.execute(code)

    def collect(self, msg_id: str, timeout: float = 90.0, on_output=None) -> dict:
        """One execution's outputs until the kernel goes idle for it, and its reply:
        ``count``, ``outputs`` [(msg_type, content)], ``stream`` (text), ``data`` (bundles
        displayed or updated), ``error`` (ename, ANSI-free traceback) and ``reply``.
        ``on_output(result so far)`` is called after each of its messages."""
        out = {"count": None, "outputs": [], "stream": "", "data": [], "error": None}
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no idle after {timeout}s; so far: {out}")
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 1.0))
            except Exception:  # queue.Empty
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "execute_input":
                out["count"] = content["execution_count"]
            elif kind in ("stream", "error", "display_data", "execute_result",
                          "update_display_data"):
                out["outputs"].append((kind, content))
                if kind == "stream":
                    out["stream"] += content["text"]
                elif kind == "error":
                    out["error"] = (content["ename"],
                                    "\n".join(ANSI.sub("", ln) for ln in content["traceback"]))
                else:
                    out["data"].append(content["data"])
            if on_output is not None:
                on_output(out)
        reply = self.kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=30)
        out["reply"] = reply
        return out

    def cell(self, code: str, timeout: float = 90.0) -> tuple:
        """Run a cell: its execution count and outputs [(msg_type, content)]."""
        out = self.collect(self.send(code), timeout)
        return out["count"], out["outputs"]

    def run(self, code: str, timeout: float = 90.0) -> dict:
        """Run a cell that must not fail; its ``collect`` result."""
        out = self.collect(self.send(code), timeout)
        assert out["error"] is None, out["error"]
        return out

    def converse(self, code: str, answers, timeout: float = 90.0) -> dict:
        """Run ``code`` with stdin allowed and answer each input request (``input()``, pdb's
        prompt) with the next of ``answers`` ("q" once they run out, so nothing waits
        forever). Returns ``collect``'s result plus ``prompts`` and ``transcript``: the
        output with each prompt and its answer where it came, as a console shows them."""
        msg_id = self.kc.execute(code, allow_stdin=True)
        answers = list(answers)
        out = {"prompts": [], "transcript": "", "stream": "", "error": None}
        deadline = time.monotonic() + timeout

        def drain(wait: float) -> bool:  # iopub for ``wait`` s at most; True once idle
            end = time.monotonic() + wait
            while True:
                try:
                    msg = self.kc.get_iopub_msg(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    return False
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "status" and content["execution_state"] == "idle":
                    return True
                if kind == "stream":
                    out["stream"] += content["text"]
                    out["transcript"] += ANSI.sub("", content["text"])
                elif kind == "error":
                    out["error"] = (content["ename"],
                                    "\n".join(ANSI.sub("", ln) for ln in content["traceback"]))

        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"no idle after {timeout}s; so far: {out}")
            if drain(0.05):
                break
            try:
                req = self.kc.get_stdin_msg(timeout=0.05)
            except queue.Empty:
                continue
            if req["msg_type"] != "input_request":
                continue
            drain(0.5)  # what was printed before the prompt comes first
            answer = answers.pop(0) if answers else "q"
            prompt = ANSI.sub("", req["content"]["prompt"])
            out["prompts"].append(prompt)
            out["transcript"] += f"{prompt}{answer}\n"
            self.kc.input(answer)
        reply = self.kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=30)
        out["reply"] = reply
        return out

    def close(self) -> None:
        try:
            self.cell("%miniray down", timeout=30)
        finally:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
