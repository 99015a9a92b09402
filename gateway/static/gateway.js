/*
 * gateway.js: gateway.fetch(url, init) for single-page apps behind the sign-in gateway.
 *
 *   <script src="/_gateway/static/gateway.js"></script>
 *   gateway.fetch("/_gateway/api/lark/open-apis/calendar/v4/calendars").then(function (r) { ... });
 *
 * Like window.fetch (same arguments, resolves the Response), with two answers handled in place:
 *   - 401 {"error": "login_required"}: the sign-in ran out. Inside the provider's client, the
 *     in-client handshake runs again without leaving the page (the handshake page's own settings
 *     and the plugin's bridge, loaded into this page: the client's JSAPI gives a code, /exchange
 *     sets a new session cookie), then the call is made once more.
 *   - 403 {"error": "consent_required", "consent_url"}: the grant lacks scopes. Inside the client
 *     the consent runs the same way (the JSAPI asks the user for exactly those scopes), then the
 *     call is made once more.
 * At most one re-login and one consent per call, in that order. Outside the client (the gateway
 * answers the login or consent URL with a redirect to the provider's browser page) it rejects with
 * {error: "login_required", loginUrl} or {error: "consent_required", consentUrl, scopes}: the app
 * decides when to navigate there. Any other failure of the silent path rejects the same way. The
 * rejection's "outcome" says why when the client answered: "denied" (the user declined),
 * "pending" (an administrator must approve first), "failed" (the client's authorization failed);
 * "navigate" or "fallback" when the provider's own page is needed (outside the client, or a
 * provider without an in-client consent: Tencent Meeting). A consent that ended so in the client is
 * reported to the gateway for its audit trail, as the handshake page does.
 * Every wait is bounded (the page fetch, the SDK script, the bridge, the exchange), as in the
 * handshake page.
 *
 * ES5 plus Promise and fetch only: it runs in old in-client webviews (Chrome 77 engines). A request
 * body that is a stream cannot be sent twice: pass a string, a Blob or FormData to get the retry.
 */
(function () {
  "use strict";

  var DEFAULT_TIMEOUT_MS = 8000;
  var loaded = {};
  var here = document.currentScript ? document.currentScript.src : "";
  // This script's own URL names the gateway's prefix: <prefix>/static/gateway.js.
  var prefix = here ? here.replace(/^[a-z]+:\/\/[^\/]+/i, "").replace(/\/static\/gateway\.js(\?.*)?$/, "") : "/_gateway";

  function withTimeout(promise, ms, what) {
    return new Promise(function (resolve, reject) {
      var timer = setTimeout(function () {
        reject({ outcome: "fallback", message: what + " did not answer in time" });
      }, ms);
      promise.then(function (value) { clearTimeout(timer); resolve(value); },
                   function (error) { clearTimeout(timer); reject(error); });
    });
  }

  function loadScript(url, ms) {
    if (!url || loaded[url]) { return Promise.resolve(); }
    return withTimeout(new Promise(function (resolve, reject) {
      var script = document.createElement("script");
      script.src = url;
      script.onload = function () { loaded[url] = true; resolve(); };
      script.onerror = function () { reject({ outcome: "fallback", message: url + " could not be loaded" }); };
      document.head.appendChild(script);
    }), ms, "a script");
  }

  // The handshake page's settings (<script id="gw-config" type="application/json">), or null.
  function pageConfig(html) {
    var match = /<script id="gw-config" type="application\/json">([\s\S]*?)<\/script>/.exec(html);
    if (!match) { return null; }
    try { return JSON.parse(match[1]); } catch (ignored) { return null; }
  }

  function postJson(url, body, ms) {
    return withTimeout(window.fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body)
    }), ms * 2, "the gateway").then(function (response) {
      if (response.ok) { return response; }
      return response.json().then(null, function () { return {}; }).then(function (data) {
        throw { outcome: "failed", message: data.message || ("HTTP " + response.status), error: data.error };
      });
    });
  }

  // One silent handshake from the login (or consent) page at pageUrl: resolves once a new
  // session cookie is set, rejects when that cannot happen here (outside the client, a refusal).
  function silently(pageUrl) {
    return withTimeout(window.fetch(pageUrl, {
      credentials: "same-origin", redirect: "manual", headers: { "Accept": "text/html" }
    }), DEFAULT_TIMEOUT_MS, "the gateway").then(function (response) {
      // A redirect: the gateway sends this browser to the provider's page (not in the client).
      if (response.type === "opaqueredirect" || response.status !== 200) {
        throw { outcome: "navigate", message: "the provider's page is needed" };
      }
      return response.text();
    }).then(function (html) {
      var config = pageConfig(html);
      if (!config || !config.plugin) { throw { outcome: "navigate", message: "no handshake page" }; }
      var ms = config.timeoutMs || DEFAULT_TIMEOUT_MS;
      var bridgeUrl = config.exchangeUrl.replace(/\/exchange\/[^\/]*$/, "") + "/static/bridge/" + config.plugin + ".js";
      return loadScript(config.jssdkUrl, ms).then(function () {
        return loadScript(bridgeUrl, ms);
      }).then(function () {
        var bridge = (window.gatewayBridges || {})[config.plugin];
        if (!bridge) { throw { outcome: "fallback", message: "no client bridge" }; }
        var bridgeConfig = config.bridge;
        bridgeConfig.timeout_ms = ms;
        // A consent panel waits for a person: the bridge bounds that wait itself.
        return withTimeout(bridge.requestCode(bridgeConfig, {
          withTimeout: withTimeout, waitingForUser: function () {}
        }), ms * 4, "the client");
      }).then(null, function (why) {
        var outcome = why && why.outcome;
        if (config.consentReportUrl && (outcome === "denied" || outcome === "pending" || outcome === "failed")) {
          postJson(config.consentReportUrl, { provider: config.provider, state: config.state, outcome: outcome },
                   ms).then(null, function () { /* the caller is told either way */ });
        }
        throw why;
      }).then(function (result) {
        if (!result || !result.code) { throw { outcome: "fallback", message: "the client returned no code" }; }
        var body = { code: result.code, state: config.state };
        if (result.context) { body.context = result.context; }
        return postJson(config.exchangeUrl, body, ms);
      });
    });
  }

  function answerOf(response) {
    var type = response.headers.get("content-type") || "";
    if (type.indexOf("json") < 0) { return Promise.resolve({}); }
    return response.clone().json().then(null, function () { return {}; });
  }

  function gatewayFetch(url, init) {
    var options = {};
    var key;
    init = init || {};
    for (key in init) { if (Object.prototype.hasOwnProperty.call(init, key)) { options[key] = init[key]; } }
    if (!options.credentials) { options.credentials = "same-origin"; }
    var done = { login: false, consent: false };

    function attempt() {
      return window.fetch(url, options).then(check);
    }

    function check(response) {
      if (response.status !== 401 && response.status !== 403) { return response; }
      return answerOf(response).then(function (answer) {
        if (response.status === 401 && answer.error === "login_required" && !done.login) {
          done.login = true;
          var loginUrl = answer.login_url || (prefix + "/login?next=" + encodeURIComponent(location.pathname + location.search));
          return silently(loginUrl).then(attempt, function (why) {
            throw { error: "login_required", loginUrl: loginUrl, outcome: why && why.outcome,
                    message: why && why.message };
          });
        }
        if (response.status === 403 && answer.error === "consent_required" && !done.consent && answer.consent_url) {
          done.consent = true;
          return silently(answer.consent_url).then(attempt, function (why) {
            throw { error: "consent_required", consentUrl: answer.consent_url, scopes: answer.scopes || [],
                    outcome: why && why.outcome, message: why && why.message };
          });
        }
        return response;
      });
    }

    return attempt();
  }

  window.gateway = window.gateway || {};
  window.gateway.fetch = gatewayFetch;
}());
