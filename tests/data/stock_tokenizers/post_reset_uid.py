"""A stock-shaped tokenizer script (Qwen3-style uid protocol, POST /reset, /no_think); see README.md."""
import argparse
import json
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

from transformers import AutoTokenizer

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
sessions = {}


def remove_think(text):
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):].lstrip()
    return text


class Conversation:
    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained("smollm2_tokenizer")
        self.messages = [{"role": "system", "content": DEFAULT_SYSTEM}]
        self.held = []
        self.pending = []

    def render(self):
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt, last_reply=None):
        if last_reply is not None:
            self.messages.append({"role": "assistant", "content": remove_think(last_reply)})
            self.held = self.tokenizer.encode(self.render())[:-3]
        self.messages.append({"role": "user", "content": prompt + " /no_think"})
        token_ids = self.tokenizer.encode(self.render())
        diff = token_ids[len(self.held):]
        self.held = token_ids
        return token_ids, diff

    def decode(self, token_ids):
        self.pending += token_ids
        text = self.tokenizer.decode(self.pending)
        if "\ufffd" in text:
            return ""
        self.pending.clear()
        return text

    def reset(self, system_prompt=DEFAULT_SYSTEM):
        self.messages = [{"role": "system", "content": system_prompt}]
        self.held = self.tokenizer.encode(self.render())[:-3]
        return self.held


class Handler(BaseHTTPRequestHandler):
    def answer(self, reply):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(reply).encode())

    def do_GET(self):
        if "/get_uid" in self.path:
            uid = str(uuid.uuid4())
            sessions[uid] = Conversation()
            return self.answer({"uid": uid})
        values = parse_qs(urlparse(self.path).query).get("uid")
        session = sessions.get(values[0] if values else None)
        if session is None:
            return self.answer({"error": "Invalid uid"})
        if "/bos_id" in self.path:
            bos = session.tokenizer.bos_token_id
            return self.answer({"bos_id": bos if bos is not None else -1})
        if "/eos_id" in self.path:
            eos = session.tokenizer.eos_token_id
            return self.answer({"eos_id": eos if eos is not None else -1})
        return self.answer({"error": "Invalid GET endpoint"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))).decode())
        if "/tokenize" in self.path:  # a test affordance for the scripted emulator (README.md)
            tokenizer = next(iter(sessions.values())).tokenizer
            return self.answer({"token_ids": tokenizer.encode(body["text"], add_special_tokens=False)})
        session = sessions.get(body.get("uid"))
        if session is None:
            return self.answer({"error": "Invalid uid"})
        if "/encode" in self.path:
            token_ids, diff = session.encode(body.get("text"), body.get("last_reply"))
            return self.answer({"token_ids": token_ids, "diff": diff})
        if "/decode" in self.path:
            return self.answer({"text": session.decode(body.get("token_ids"))})
        if "/reset" in self.path:
            system_prompt = body.get("system_prompt")
            ids = session.reset(system_prompt) if system_prompt is not None else session.reset()
            return self.answer({"token_ids": ids})
        return self.answer({"error": "Invalid POST endpoint"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", type=str, default="0.0.0.0")
    parser.add_argument("--port", type=int, default=12345)
    args = parser.parse_args()
    print("Server running at http://%s:%s" % (args.host, args.port))
    HTTPServer((args.host, args.port), Handler).serve_forever()
