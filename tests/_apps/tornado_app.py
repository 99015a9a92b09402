"""A Tornado app written the way its users write one, for tests/test_real_apps.py.

Tornado's own HTTP server, ``xsrf_cookies=True`` (every POST needs the ``_xsrf`` token of the page's
form), and a WebSocket handler with Tornado's default ``check_origin`` (the Origin's host must be the
request's Host: the check Jupyter inherits). Nothing here knows about the gateway but the identity
header it reads. Run: ``python tests/_apps/tornado_app.py PORT`` (logs to stderr, debug included,
so a refused WebSocket says why).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import tornado.template
import tornado.web
import tornado.websocket

PAGE = tornado.template.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>Tornado behind the sidecar</title></head>
<body>
<p>user: <span id="user">{{ user }}</span></p>
<p>host: <span id="host">{{ request.host }}</span></p>
<form method="post" action="/notes">{% module xsrf_form_html() %}
  <input name="text" id="text"><button id="save" type="submit">Save</button>
</form>
<p>websocket: <span id="ws">connecting</span></p>
<script>
  const socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  const shown = document.getElementById("ws");
  socket.onopen = () => socket.send("ping");
  socket.onmessage = (event) => { shown.textContent = "echo " + event.data; socket.close(); };
  socket.onclose = (event) => {
    if (!shown.textContent.startsWith("echo")) shown.textContent = "closed " + event.code;
  };
</script>
</body></html>
""")

SAVED = tornado.template.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>Saved</title></head>
<body><p id="saved">saved {{ text }} for {{ user }}</p></body></html>
""")


class BaseHandler(tornado.web.RequestHandler):
    def user(self) -> str:
        return self.request.headers.get("X-Auth-User", "")


class PageHandler(BaseHandler):
    def get(self) -> None:
        self.finish(PAGE.generate(**self.get_template_namespace(), user=self.user()))


class NotesHandler(BaseHandler):
    def post(self) -> None:  # xsrf_cookies=True: Tornado refuses it (403) without the form's token
        self.finish(SAVED.generate(text=self.get_body_argument("text"), user=self.user()))


class EchoSocket(tornado.websocket.WebSocketHandler):
    # check_origin is Tornado's own: a browser's Origin must name the Host the request carries.
    def on_message(self, message: str | bytes) -> None:
        self.write_message(message)


async def main(port: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("tornado.access", "tornado.application", "tornado.general"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.DEBUG)
    app = tornado.web.Application([
        (r"/", PageHandler),
        (r"/notes", NotesHandler),
        (r"/ws", EchoSocket),
    ], xsrf_cookies=True)
    app.listen(port, address="127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
