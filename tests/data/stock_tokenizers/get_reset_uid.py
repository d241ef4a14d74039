"""A stock-shaped tokenizer script (Qwen2.5-era uid protocol, GET /reset); see README.md."""
import argparse
import json
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

from transformers import AutoTokenizer

sessions = {}


class Conversation:
    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained("smollm2_tokenizer")
        self.messages = [{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}]
        self.held = []

    def render(self):
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt, last_reply=None):
        if last_reply is not None:
            self.messages.append({"role": "assistant", "content": last_reply})
            self.held = self.tokenizer.encode(self.render())[:-3]
        self.messages.append({"role": "user", "content": prompt})
        token_ids = self.tokenizer.encode(self.render())
        diff = token_ids[len(self.held):]
        self.held = token_ids
        return token_ids, diff

    def reset(self):
        self.messages = [{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}]


class Handler(BaseHTTPRequestHandler):
    def query(self, key):
        values = parse_qs(urlparse(self.path).query).get(key)
        return values[0] if values else None

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
        session = sessions.get(self.query("uid"))
        if session is None:
            return self.answer({"error": "Invalid uid"})
        if "/bos_id" in self.path:
            bos = session.tokenizer.bos_token_id
            return self.answer({"bos_id": bos if bos is not None else -1})
        if "/eos_id" in self.path:
            eos = session.tokenizer.eos_token_id
            return self.answer({"eos_id": eos if eos is not None else -1})
        if "/reset" in self.path:
            session.reset()
            return self.answer({"success": True})
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
            return self.answer({"text": session.tokenizer.decode(body.get("token_ids"))})
        return self.answer({"error": "Invalid POST endpoint"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", type=str, default="localhost")
    parser.add_argument("--port", type=int, default=12345)
    args = parser.parse_args()
    print("Server running at http://%s:%s" % (args.host, args.port))
    HTTPServer((args.host, args.port), Handler).serve_forever()
