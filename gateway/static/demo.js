/*
 * The demo tour's page script (gateway demo, /demo/ and the app page /). Served from the demo's own
 * origin: the demo's Content-Security-Policy allows 'self' scripts only, nothing inline.
 *
 * - switches and buttons POST JSON to /demo/api/<action> (emulator switches) or /demo-api/<action>
 *   (actions on the signed-in user's tokens, behind the gateway);
 * - the timeline polls /demo/api/timeline?after=<last seen> and appends each step with the time
 *   since the step before;
 * - "Your session" asks /whoami (behind the gateway) for the identity the app received;
 * - the relay page (/relay) calls one Open API with gateway.fetch (the gateway's gateway.js) and
 *   lists every request gateway.fetch makes on the way (a consent round trip shows as its steps).
 */
(function () {
  "use strict";

  var POLL_MS = 700;
  var KIND_LABELS = {
    jsapi: "JSAPI call", code: "code", exchange: "exchange", tokens: "tokens", identity: "identity",
    refresh: "refresh", revoked: "tokens died", refused: "refused", approval: "approval", admin: "emulator",
    call: "call", open: "open", app: "app request", "switch": "switch", demo: "demo"
  };
  var pageKind = document.body.getAttribute("data-page");
  var cursor = 0;
  var previousAt = null;
  var signedInWith = null;

  function byId(id) { return document.getElementById(id); }

  function request(url, body) {
    var options = { credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (body !== undefined) {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(url, options).then(function (response) {
      return response.json().then(function (data) {
        if (!response.ok) { data.status = response.status; throw data; }
        return data;
      }, function () {
        if (!response.ok) { throw { status: response.status, message: "HTTP " + response.status }; }
        return {};
      });
    });
  }

  // A sentence in the element ``id``, and the stable error code as a small labelled detail
  // (never as if it were text).
  function show(id, text, code) {
    var node = byId(id);
    if (!node) { return; }
    node.hidden = false;
    node.textContent = text;
    if (code) {
      var detail = document.createElement("small");
      detail.className = "code";
      detail.textContent = "error code: " + code;
      node.appendChild(document.createTextNode(" "));
      node.appendChild(detail);
    }
  }

  function say(text, code) {
    show("tour-message", text, code);
  }

  function failed(error) {
    say((error && error.message) || "That did not work.", error && error.error);
  }

  // -- the timeline ------------------------------------------------------------------------------

  function elapsed(ms) {
    if (ms < 1000) { return "+" + Math.round(ms) + " ms"; }
    if (ms < 60000) { return "+" + (ms / 1000).toFixed(1) + " s"; }
    return "+" + Math.round(ms / 60000) + " min";
  }

  function clock(at) {
    var date = new Date(at * 1000);
    function pad(n, width) { var s = String(n); while (s.length < width) { s = "0" + s; } return s; }
    return pad(date.getHours(), 2) + ":" + pad(date.getMinutes(), 2) + ":" + pad(date.getSeconds(), 2) + "." +
      pad(date.getMilliseconds(), 3);
  }

  function span(className, text) {
    var node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  function addEvent(list, event) {
    var item = document.createElement("li");
    item.className = "ev ev-" + event.kind;
    var when = previousAt === null ? "start" : elapsed((event.at - previousAt) * 1000);
    previousAt = event.at;
    var head = document.createElement("div");
    head.className = "head";
    var time = span("when", when);
    time.title = clock(event.at);
    head.appendChild(time);
    head.appendChild(span("kind k-" + event.kind, KIND_LABELS[event.kind] || event.kind));
    head.appendChild(span("src", event.source));
    item.appendChild(head);
    item.appendChild(span("what", event.text));
    list.appendChild(item);
  }

  function poll() {
    var list = byId("timeline");
    if (!list) { return; }
    request("/demo/api/timeline?after=" + cursor).then(function (data) {
      var first = 0;
      if ((pageKind === "app" || pageKind === "relay") && cursor === 0) {
        // The app and relay pages tell the sign-in that led here: from the last "open" on.
        for (var k = 0; k < data.events.length; k += 1) { if (data.events[k].kind === "open") { first = k; } }
      }
      for (var i = first; i < data.events.length; i += 1) { addEvent(list, data.events[i]); }
      cursor = data.last;
    }, function () { /* the next poll asks again */ }).then(function () {
      setTimeout(poll, POLL_MS);
    });
  }

  // -- the session ---------------------------------------------------------------------------------

  function titleOf(provider) {
    var card = byId("provider-" + provider);
    var heading = card && card.querySelector("h2");
    return heading ? heading.textContent : provider;
  }

  function loadIdentity() {
    var summary = byId("identity-summary");
    if (!summary) { return Promise.resolve(); }
    var claimsNode = byId("identity-claims");
    return request("/whoami").then(function (data) {
      var claims = data.claims || {};
      signedInWith = claims.provider || null;
      summary.textContent = "Signed in with " + titleOf(claims.provider) + " as " + (claims.name || claims.user) +
        ". The identity the app received (" + data.verified + "):";
      claimsNode.textContent = JSON.stringify(claims, null, 2);
      claimsNode.hidden = false;
    }, function () {
      signedInWith = null;
      summary.textContent = "Not signed in: open the app with a provider below.";
      claimsNode.hidden = true;
    });
  }

  // -- switches ------------------------------------------------------------------------------------

  function applyState(state) {
    var providers = (state && state.providers) || [];
    for (var i = 0; i < providers.length; i += 1) {
      var entry = providers[i];
      var boxes = document.querySelectorAll('input[data-provider="' + entry.name + '"]');
      for (var j = 0; j < boxes.length; j += 1) {
        var value = entry[boxes[j].getAttribute("data-switch")];
        if (typeof value === "boolean") { boxes[j].checked = value; }
      }
      var status = document.querySelector('[data-status="' + entry.name + '"]');
      if (status) { status.textContent = entry.approval_status ? "administrator: " + entry.approval_status : ""; }
    }
  }

  // A provider's client-side bridge may remember an administrator's grant in this browser: a user
  // who has never been granted it has no such mark, so the demo removes the keys the switch names
  // (data-forget-storage: a JSON list of key prefixes, from the emulator's tour entry) when it goes on.
  function forgetStoredGrants(box) {
    var prefixes;
    try { prefixes = JSON.parse(box.getAttribute("data-forget-storage") || "[]"); } catch (ignored) { return; }
    try {
      for (var i = window.localStorage.length - 1; i >= 0; i -= 1) {
        var key = window.localStorage.key(i);
        for (var j = 0; key && j < prefixes.length; j += 1) {
          if (key.indexOf(prefixes[j]) === 0) { window.localStorage.removeItem(key); break; }
        }
      }
    } catch (ignored) { /* no storage: nothing remembered either */ }
  }

  function onSwitch(event) {
    var box = event.target;
    var provider = box.getAttribute("data-provider");
    var which = box.getAttribute("data-switch");
    if (which === "approval" && box.checked) { forgetStoredGrants(box); }
    request("/demo/api/switch", { provider: provider, "switch": which, on: box.checked }).then(function (state) {
      applyState(state);
      say(titleOf(provider) + ": " + (box.checked ? "on" : "off") + ". Open the app with it to see what happens.");
    }, function (error) {
      box.checked = !box.checked;
      failed(error);
    });
  }

  function burst(count) {
    var requests = [];
    for (var i = 1; i <= count; i += 1) { requests.push(request("/whoami?burst=" + i)); }
    return Promise.all(requests);
  }

  function onAction(event) {
    var button = event.target;
    var action = button.getAttribute("data-action");
    var provider = button.getAttribute("data-provider");
    var title = titleOf(provider);
    if (action === "approve" || action === "reject") {
      request("/demo/api/" + action, { provider: provider }).then(function (state) {
        applyState(state);
        say(action === "approve" ? "The administrator approved. Open the app with " + title + " again."
                                 : "The administrator refused. Open the app with " + title + " to see what the user is told.");
      }, failed);
    } else if (action === "expire") {
      request("/demo-api/expire", { provider: provider }).then(function (answer) {
        return burst(answer.burst).then(function () {
          say(answer.refreshable ? answer.burst + " requests answered: the timeline shows the one refresh they shared."
                                 : "This sign-in had no refresh token: the gateway ended the session.");
          return loadIdentity();
        }, function (error) {
          say("The requests after the expiry were not answered as signed in.", error && error.error);
          return loadIdentity();
        });
      }, failed);
    } else if (action === "second-device") {
      say("A second device is signing in to " + title + "…");
      request("/demo-api/second-device", { provider: provider }).then(function (answer) {
        var text = answer.signed_in ? "The second device is signed in." : "The second device could not sign in.";
        if (answer.old_refresh === "refused") { text += " " + title + " refused the first device's old refresh token."; }
        if (answer.old_refresh === "accepted") { text += " " + title + " still accepted the first device's old refresh token."; }
        say(text + " This browser's session goes on with the newest tokens.");
        return loadIdentity();
      }, failed);
    }
  }

  function wire() {
    var boxes = document.querySelectorAll("input[data-switch]");
    for (var i = 0; i < boxes.length; i += 1) { boxes[i].addEventListener("change", onSwitch); }
    var buttons = document.querySelectorAll("button[data-action]");
    for (var j = 0; j < buttons.length; j += 1) { buttons[j].addEventListener("click", onAction); }
    var clear = byId("timeline-clear");
    if (clear) {
      clear.addEventListener("click", function () {
        byId("timeline").textContent = "";
        previousAt = null;
      });
    }
  }

  // -- the relay page ------------------------------------------------------------------------------

  var relaySteps = null;
  var gatewayPrefix = null;

  function shortPath(url) {
    var path = String(url).replace(/^[a-z]+:\/\/[^\/]+/i, "");
    return path.length > 90 ? path.slice(0, 90) + "…" : path;
  }

  function addStep(text) {
    var item = document.createElement("li");
    item.textContent = text;
    relaySteps.appendChild(item);
    return item;
  }

  // What one answer on the way means (the item is added now, so the steps keep their order).
  function describeStep(item, head, response) {
    if (response.type === "opaqueredirect") {
      item.textContent = head + " → a redirect to the provider's own page (not possible without leaving this page)";
      return;
    }
    var type = response.headers.get("content-type") || "";
    if (type.indexOf("json") < 0) {
      var page = response.status === 200 && type.indexOf("html") >= 0;
      item.textContent = head + " → " + response.status + (page ? ": the handshake page's settings; the client's " +
        "JSAPI runs in this page (its JSSDK and bridge loaded here)" : "");
      return;
    }
    response.clone().json().then(function (data) {
      var text = head + " → " + response.status;
      if (data && data.error) { text += " " + data.error; }
      if (data && data.scopes && data.scopes.length) { text += " (scopes: " + data.scopes.join(", ") + ")"; }
      if (data && data.error_info) { text += " error_code " + data.error_info.error_code; }
      if (data && typeof data.code === "number" && data.code !== 0) { text += " code " + data.code; }
      if (head.indexOf("/exchange/") >= 0 && response.ok) { text += ": the new grant, the session renewed"; }
      item.textContent = text;
    }, function () { item.textContent = head + " → " + response.status; });
  }

  // gateway.fetch calls window.fetch for each step: watch the ones that go to the gateway.
  function watchGatewayCalls() {
    var realFetch = window.fetch;
    window.fetch = function (url, init) {
      var promise = realFetch.apply(window, arguments);
      var path = shortPath(url && url.url ? url.url : url);
      if (!relaySteps || path.indexOf(gatewayPrefix + "/") !== 0) { return promise; }
      var head = ((init && init.method) || "GET") + " " + path;
      var item = addStep(head + " …");
      return promise.then(function (response) {
        describeStep(item, head, response);
        return response;
      }, function (error) {
        item.textContent = head + " → no answer";
        throw error;
      });
    };
  }

  function relayStatus(text, code) {
    show("relay-status", text, code);
  }

  function showAnswer(data) {
    var node = byId("relay-answer");
    node.textContent = typeof data === "string" ? data : JSON.stringify(data, null, 2);
    node.hidden = false;
  }

  function onRelayCall(event) {
    var button = event.target;
    var url = button.getAttribute("data-url");
    var noConsent = button.getAttribute("data-consent") === "none";
    relaySteps.textContent = "";
    byId("relay-answer").hidden = true;
    byId("relay-consent").hidden = true;
    var reauthorize = byId("relay-reauthorize");
    if (reauthorize) { reauthorize.hidden = true; }
    relayStatus("Calling…");
    button.disabled = true;
    window.gateway.fetch(url, { headers: { "Accept": "application/json" } }).then(function (response) {
      return response.text().then(function (text) {
        var data = text;
        try { data = JSON.parse(text); } catch (ignored) { /* shown as text */ }
        showAnswer(data);
        if (response.ok) {
          relayStatus("HTTP " + response.status + ": the provider's answer, through the relay" +
            (relaySteps.children.length > 1 ? ", after the steps above" : "") + ".");
          return;
        }
        var code = data && (data.error || (data.error_info && String(data.error_info.error_code)));
        relayStatus("HTTP " + response.status + ": the provider's answer, passed on." +
          (noConsent ? " See above: this provider has no in-client consent." : ""), code);
        if (reauthorize && noConsent) { reauthorize.hidden = false; }
      });
    }, function (failure) {
      var target = (failure && (failure.consentUrl || failure.loginUrl)) || "";
      relayStatus("gateway.fetch could not do it in this page" + (failure && failure.message ? " (" +
        failure.message + ")" : "") + ": the user must continue on the provider's page.", failure && failure.error);
      if (target.charAt(0) === "/" && target.charAt(1) !== "/") {
        byId("relay-consent-link").setAttribute("href", target);
        byId("relay-consent").hidden = false;
      }
    }).then(function () { button.disabled = false; });
  }

  function onWithhold(event) {
    var provider = event.target.getAttribute("data-provider");
    request("/demo/api/grant", { provider: provider, granted: false }).then(function (answer) {
      say("The user has not granted " + answer.scope + " now. Call the API to see what happens.");
    }, failed);
  }

  function wireRelay() {
    var button = byId("relay-call");
    var loaded = byId("relay-loaded");
    if (loaded) { loaded.textContent = clock(Date.now() / 1000); }
    if (!button) { return; }
    gatewayPrefix = button.getAttribute("data-url").replace(/\/api\/.*$/, "");
    relaySteps = byId("relay-steps");
    watchGatewayCalls();
    button.addEventListener("click", onRelayCall);
    var withhold = byId("relay-withhold");
    if (withhold) { withhold.addEventListener("click", onWithhold); }
  }

  if (pageKind === "tour" || pageKind === "app" || pageKind === "relay") {
    wire();
    if (pageKind === "relay") { wireRelay(); }
    loadIdentity();
    poll();
  }
})();
