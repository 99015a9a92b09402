/*
 * The handshake page runtime: ask the client's JSAPI for a one-time code, hand it to the gateway,
 * go on to the app. Runs inside old embedded webviews (Chrome 77 and older engines), so: ES5 syntax
 * plus Promise and fetch-with-XHR-fallback only.
 *
 * The page embeds its settings as JSON in <script id="gw-config" type="application/json">:
 *   {plugin, exchangeUrl, fallbackUrl, next, timeoutMs, jssdkUrl, bridge: {...provider's config},
 *    lang, messages: {...every string the page shows, in the page's language}}
 * The gateway chose the language (Accept-Language, gateway/i18n.py); the script has no words of
 * its own. The /exchange answers' messages are in that language too (the request carries the same
 * Accept-Language); a bridge's reasons are English, so other languages show the page's own text.
 *
 * A provider's bridge.js registers window.gatewayBridges[plugin] = {requestCode(config, tools)}:
 * it resolves {code, context?} or rejects {outcome, message}: "fallback" (use the browser OAuth),
 * "denied", "pending" (an administrator must approve), "failed" (the client's authorization failed
 * and the browser OAuth cannot ask the same: an administrator's grant), or "navigating" (the bridge
 * started the provider's own authorization page, which comes back to /callback/<provider>).
 * A page that ends (declined, pending, failed) names the stable code in <code id="gw-code">, as the
 * gateway's own error pages do: access_denied, approval_pending, provider_error.
 * An incremental consent (<prefix>/consent) that ends so in the client happens out of the gateway's
 * sight: the page reports it (config.consentReportUrl, {provider, state, outcome}) for the audit
 * trail, once, without waiting for the answer.
 * tools.waitingForUser() tells the page the bridge is waiting for the user (a consent panel):
 * the page's overall watchdog stops, and the bridge bounds that wait itself.
 * Every wait is bounded: the SDK script, the bridge (ready hook and each JSAPI call) and the
 * exchange. The page never ends blank: it moves on, or says what happened and offers a way on.
 */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("gw-config").textContent);
  var statusNode = document.getElementById("gw-status");
  var actionsNode = document.getElementById("gw-actions");
  var finished = false;
  var exchanging = false;
  var t = config.messages;
  var english = config.lang === "en";

  function say(text) {
    statusNode.textContent = text;
  }

  function offer(label, href, style) {
    var link = document.createElement("a");
    link.className = style ? "button " + style : "button";
    link.href = href;
    link.textContent = label;
    actionsNode.appendChild(link);
  }

  function stop(title, message, code) {
    if (finished) { return; }
    finished = true;
    document.getElementById("gw-title").textContent = title;
    say(message);
    if (code) {
      var line = document.createElement("p");
      var node = document.createElement("code");
      node.id = "gw-code";
      node.textContent = code;
      line.appendChild(node);
      statusNode.parentNode.insertBefore(line, actionsNode);
    }
    offer(t.tryAgain, window.location.href);
    // The page's own state may be spent by now: a fresh login, forced to the browser OAuth.
    offer(t.browserSignIn, config.browserUrl, "secondary");
  }

  function fallback(reason) {
    if (finished) { return; }
    finished = true;
    say(t.toBrowser.replace("{reason}", reason && english ? " (" + reason + ")" : ""));
    window.location.replace(config.fallbackUrl);
  }

  function withTimeout(promise, ms, what) {
    return new Promise(function (resolve, reject) {
      var timer = setTimeout(function () {
        reject({ outcome: "fallback", message: what + " did not answer in time" });
      }, ms);
      promise.then(function (value) { clearTimeout(timer); resolve(value); },
                   function (error) { clearTimeout(timer); reject(error); });
    });
  }

  function loadScript(url) {
    if (!url) { return Promise.resolve(); }
    return withTimeout(new Promise(function (resolve, reject) {
      var script = document.createElement("script");
      script.src = url;
      script.onload = function () { resolve(); };
      script.onerror = function () { reject({ outcome: "fallback", message: "the client SDK could not be loaded" }); };
      document.head.appendChild(script);
    }), config.timeoutMs, "the client SDK");
  }

  function postJson(url, body) {
    return new Promise(function (resolve, reject) {
      var request = new XMLHttpRequest();
      request.open("POST", url, true);
      request.setRequestHeader("Content-Type", "application/json");
      request.setRequestHeader("Accept", "application/json");
      request.timeout = config.timeoutMs * 2;
      request.onload = function () {
        var data = {};
        try { data = JSON.parse(request.responseText); } catch (ignored) { data = {}; }
        if (request.status >= 200 && request.status < 300) { resolve(data); }
        else { reject({ status: request.status, error: data.error, message: data.message }); }
      };
      request.onerror = function () { reject({ status: 0, message: t.networkFailed }); };
      request.ontimeout = function () { reject({ status: 0, message: t.gatewayTimeout }); };
      request.send(JSON.stringify(body));
    });
  }

  // The consent's end in the client, for the gateway's audit trail; nothing waits for it.
  function report(outcome) {
    if (!config.consentReportUrl) { return; }
    postJson(config.consentReportUrl, { provider: config.provider, state: config.state, outcome: outcome })
      .then(null, function () { /* the page says what happened either way */ });
  }

  function exchange(result) {
    exchanging = true;
    say(t.signingYouIn);
    var body = { code: result.code, state: config.state };
    if (result.context) { body.context = result.context; }
    return postJson(config.exchangeUrl, body).then(function (data) {
      finished = true;
      window.location.replace(data.next || config.next || "/");
    }, function (error) {
      if (error.error === "approval_pending") {
        stop(t.pendingTitle, error.message || t.approvalNeeded, error.error);
      } else if (error.status === 403 || error.error === "access_denied") {
        stop(t.notCompletedDenied, error.message || t.accessWasDenied, error.error);
      } else if (error.status === 401 || error.error === "state_invalid") {
        // A code that expired or was already used: one more silent attempt, then a page.
        if (window.sessionStorage && !window.sessionStorage.getItem("gw-retried")) {
          window.sessionStorage.setItem("gw-retried", "1");
          finished = true;
          window.location.replace(config.retryUrl);
        } else {
          stop(t.notCompleted, error.message || t.codeUnusable);
        }
      } else {
        stop(t.notCompleted, error.message || t.exchangeFailed);
      }
    });
  }

  function run() {
    say(t.connectingTo);
    loadScript(config.jssdkUrl).then(function () {
      var bridges = window.gatewayBridges || {};
      var bridge = bridges[config.plugin];
      if (!bridge) { throw { outcome: "fallback", message: "no client bridge" }; }
      var bridgeConfig = config.bridge;
      bridgeConfig.timeout_ms = config.timeoutMs;
      return bridge.requestCode(bridgeConfig, {
        withTimeout: withTimeout,
        // A bridge showing the user a consent panel bounds that wait itself; the page's
        // watchdog must not pull the page away while the user reads it.
        waitingForUser: function () { exchanging = true; }
      });
    }).then(function (result) {
      if (!result || !result.code) { throw { outcome: "fallback", message: "the client returned no code" }; }
      return exchange(result);
    }).then(null, function (error) {
      error = error || {};
      if (error.outcome === "navigating") {
        // The bridge handed the page to the provider's own authorization flow, which may wait
        // for the user: no watchdog from here on.
        exchanging = true;
        say(t.continuingWith);
      } else if (error.outcome === "pending") {
        report("pending");
        stop(t.pendingTitle, english && error.message ? error.message : t.pending, "approval_pending");
      } else if (error.outcome === "denied") {
        report("denied");
        stop(t.deniedTitle, english && error.message ? error.message : t.declined, "access_denied");
      } else if (error.outcome === "failed") {
        report("failed");
        stop(t.notCompleted, english && error.message ? error.message : t.providerFailed, "provider_error");
      } else {
        fallback(error.message);
      }
    });
  }

  // Whatever happens inside the client bridge, the page moves on in bounded time.
  setTimeout(function () {
    if (!exchanging) { fallback("the client did not answer"); }
  }, config.timeoutMs * 4);
  if (window.sessionStorage && config.fresh) { window.sessionStorage.removeItem("gw-retried"); }
  run();
}());
