/*
 * DingTalk bridge: asks the DingTalk client's JSAPI (window.dd, from dingtalk.open.js) for a code.
 *
 * Runs on old in-client webviews, so: ES5 syntax only (plus Promise), no arrow functions,
 * no let/const, no template strings, no async/await.
 *
 * What it does (fact sheet sections 2.2-2.5):
 *   1. Outside DingTalk (no window.dd, or dd.env.platform "notInDingTalk") it falls back to the
 *      browser OAuth at once: dd.ready never fires there.
 *   2. corpId: the page URL's own ?corpid= (third-party apps only), else the one the gateway
 *      derived from the app path (the homepage's ?corpid=$CORPID$) or its config.
 *   3. dd.ready (bounded; login JSAPIs need no dd.config).
 *   4. appScopes set: the authorization component, type 1 (an administrator grants the app's
 *      permissions): ok -> go on (remembered in localStorage), toAdmin -> "pending",
 *      cancel -> "denied", failed -> go on (the login itself does not need those permissions).
 *      An incremental consent for an app-token route (config.appConsent, /consent?grant=app) asks
 *      even when a grant is remembered (the provider has just refused the app's token), and its
 *      failed -> "failed": that grant is what the sign-in is for, and no browser page asks it.
 *   5. scopes set: the authorization component, type 0 (the user consents; a user token):
 *      ok -> {code: result.authCode, context: {kind: "open_auth", corpId}}, toAdmin -> "pending",
 *      cancel -> "denied", failed -> "fallback" (the browser OAuth asks the same consent).
 *      Otherwise the free-login code: dd.requestAuthCode({corpId, clientId}) where it exists, else
 *      (or when it fails) dd.runtime.permission.requestAuthCode({corpId}):
 *      {code, context: {kind: "auth_code", corpId}}.
 *
 * The authorization component has no bundler-free build (dingtalk-design-libs is npm only), so this
 * does what its openAuth() does: on mobile biz.util.callComponent with DingTalk's authorization
 * mini program, on PC biz.util.openModal with its page; both take an unencoded query.
 * Every wait is bounded by tools.withTimeout: a client bridge that never initialises leaves the
 * SDK's promises pending forever. A consent panel waits for a person, so it gets three times the
 * usual bound, and tools.waitingForUser() stops the page's own watchdog meanwhile.
 */
(function () {
  "use strict";

  var OPEN_AUTH_MIN_VERSION = "6.3.35";
  var AUTH_MINI_APP_ID = "5000000000174977";
  var AUTH_PC_PAGE = "https://n.dingtalk.com/dingding/h5-common-authority/auth/index.html";
  var CORP_ID = /^[A-Za-z0-9_\-]{1,64}$/;
  var CONSENT_KEY = "gw-dingtalk-app-consent:";

  function reason(outcome, message) {
    return { outcome: outcome, message: message };
  }

  function fallback(message) {
    return reason("fallback", message);
  }

  // A readable account of a JSAPI failure: {errorCode, errorMessage} (sheet 2.4) or anything else.
  function describe(err) {
    if (!err || typeof err !== "object") {
      return String(err);
    }
    var parts = [];
    if (err.errorCode !== undefined) {
      parts.push("errorCode " + err.errorCode);
    }
    if (err.errorMessage || err.message) {
      parts.push(String(err.errorMessage || err.message));
    }
    return parts.length ? parts.join(", ") : "no details";
  }

  // The PC container marks (S1 lib/env.js): window.name JSON with containerId, or invokeAPI.
  function isPcContainer() {
    try {
      var info = JSON.parse(window.name || "null");
      if (info && typeof info === "object" && info.containerId) {
        return true;
      }
    } catch (ignored) {
      // not JSON: not the PC container's name
    }
    return !!(window.dingtalk && window.dingtalk.platform && window.dingtalk.platform.invokeAPI);
  }

  function platformOf(dd) {
    if (dd.env && typeof dd.env.platform === "string") {
      return dd.env.platform;
    }
    return isPcContainer() ? "pc" : "";
  }

  function pageCorpId() {
    var query = window.location.search.replace(/^\?/, "").split("&");
    for (var i = 0; i < query.length; i += 1) {
      var pair = query[i].split("=");
      var key = decodeURIComponent(pair[0] || "");
      if (key === "corpid" || key === "corpId") {
        var value = decodeURIComponent((pair[1] || "").replace(/\+/g, " "));
        if (CORP_ID.test(value)) {
          return value;
        }
      }
    }
    return "";
  }

  // -1, 0, 1 for dotted versions ("7.8.10-Release.250724002" compares as 7.8.10).
  function compareVersion(a, b) {
    var left = String(a).split("-")[0].split(".");
    var right = String(b).split("-")[0].split(".");
    for (var i = 0; i < Math.max(left.length, right.length); i += 1) {
      var x = parseInt(left[i] || "0", 10) || 0;
      var y = parseInt(right[i] || "0", 10) || 0;
      if (x !== y) {
        return x < y ? -1 : 1;
      }
    }
    return 0;
  }

  // Call one dd API in both of its styles (a returned Promise and onSuccess/onFail/onCancel),
  // bounded by the timeout. A JSAPI failure rejects {ddFailure}; a timeout rejects "fallback".
  function callDd(fn, self, args, what, ms, tools) {
    var call = new Promise(function (resolve, reject) {
      args.onSuccess = function (res) {
        resolve(res);
      };
      args.onFail = function (err) {
        reject({ ddFailure: err || {} });
      };
      args.onCancel = function (err) {
        reject({ ddFailure: err || { errorCode: "-1" }, cancelled: true });
      };
      try {
        var returned = fn.call(self, args);
        if (returned && typeof returned.then === "function") {
          returned.then(resolve, function (err) {
            reject({ ddFailure: err || {} });
          });
        }
      } catch (err) {
        reject({ ddFailure: { errorMessage: what + " threw: " + err } });
      }
    });
    return tools.withTimeout(call, ms, what);
  }

  function codeFrom(res, context) {
    var code = res && (res.code || res.authCode);
    if (typeof code === "string" && code) {
      return { code: code, context: context };
    }
    throw fallback("DingTalk answered without a code");
  }

  // -- the free-login code (免登授权码) --------------------------------------------------------

  function oldRequestAuthCode(dd, corpId, config, tools) {
    var permission = dd.runtime && dd.runtime.permission;
    if (!permission || typeof permission.requestAuthCode !== "function") {
      return null;
    }
    return callDd(permission.requestAuthCode, permission, { corpId: corpId },
      "dd.runtime.permission.requestAuthCode", config.timeout_ms, tools);
  }

  function freeLoginCode(dd, corpId, config, tools) {
    var context = { kind: "auth_code", corpId: corpId };
    var failed = function (err) {
      if (!err || !err.ddFailure) {
        throw err; // a timeout, already shaped by tools.withTimeout
      }
      throw fallback("DingTalk requestAuthCode failed (" + describe(err.ddFailure) + ")");
    };
    if (typeof dd.requestAuthCode !== "function") {
      var old = oldRequestAuthCode(dd, corpId, config, tools);
      if (!old) {
        return Promise.reject(fallback("this DingTalk client offers no requestAuthCode"));
      }
      return old.then(function (res) {
        return codeFrom(res, context);
      }, failed);
    }
    // No official order between the two is stated: the new one first, the old one when the new
    // one fails (clients older than 7.0.45 / 7.0.50 lack its native call).
    return callDd(dd.requestAuthCode, dd, { corpId: corpId, clientId: config.clientId },
      "dd.requestAuthCode", config.timeout_ms, tools).then(function (res) {
      return codeFrom(res, context);
    }, function (err) {
      if (!err || !err.ddFailure) {
        throw err;
      }
      var old = oldRequestAuthCode(dd, corpId, config, tools);
      if (!old) {
        throw fallback("DingTalk requestAuthCode failed (" + describe(err.ddFailure) + ")");
      }
      return old.then(function (res) {
        return codeFrom(res, context);
      }, function (oldErr) {
        if (!oldErr || !oldErr.ddFailure) {
          throw oldErr;
        }
        throw fallback("DingTalk requestAuthCode failed (" + describe(err.ddFailure) + "; then " +
          describe(oldErr.ddFailure) + ")");
      });
    });
  }

  // -- the authorization component (授权组件, openAuth) ----------------------------------------

  function parseModalAnswer(res) {
    var data = res;
    if (data && typeof data === "object" && data.data !== undefined && data.status === undefined) {
      data = data.data;
    }
    if (typeof data === "string") {
      try {
        data = JSON.parse(data);
      } catch (ignored) {
        data = null;
      }
    }
    return data;
  }

  // Resolves {status, result} like openAuth(); rejects {unsupported} when this client cannot
  // show the component, or the withTimeout rejection.
  function openAuth(dd, where, params, config, tools) {
    var version = dd.env && dd.env.version;
    if (version && compareVersion(version, OPEN_AUTH_MIN_VERSION) < 0) {
      return Promise.reject({ unsupported: "the DingTalk client " + version + " is older than " +
        OPEN_AUTH_MIN_VERSION });
    }
    // Built exactly as dingtalk-design-libs builds it: not URL-encoded.
    var query = "type=" + params.type + "&clientId=" + params.clientId + "&corpId=" + params.corpId +
      "&rpcScope=" + params.rpcScope + "&fieldScope=" + params.fieldScope;
    var util = dd.biz && dd.biz.util;
    // A person reads the panel: tell the page to stop its own watchdog, and bound the wait here.
    var ms = config.timeout_ms * 3;
    if (typeof tools.waitingForUser === "function") { tools.waitingForUser(); }
    var call;
    if (where === "pc" || isPcContainer()) {
      if (!util || typeof util.openModal !== "function") {
        return Promise.reject({ unsupported: "dd.biz.util.openModal is missing" });
      }
      call = callDd(util.openModal, util, { url: AUTH_PC_PAGE + "?" + query, size: "middle", title: "授权申请" },
        "the DingTalk authorization panel", ms, tools).then(parseModalAnswer);
    } else {
      if (!util || typeof util.callComponent !== "function") {
        return Promise.reject({ unsupported: "dd.biz.util.callComponent is missing" });
      }
      call = callDd(util.callComponent, util, {
        componentType: "miniProgram",
        params: { miniAppId: AUTH_MINI_APP_ID, page: "pages/auth/index?" + query, target: "float",
                  panelHeight: "percent50" }
      }, "the DingTalk authorization panel", ms, tools).then(function (res) {
        return res && res.detail ? res.detail.extraData : null;
      });
    }
    return call.then(function (answer) {
      // openAuth() turns a closed panel (no answer) into "cancel".
      return answer && typeof answer === "object" && answer.status ? answer : { status: "cancel", result: null };
    }, function (err) {
      if (err && err.ddFailure) {
        if (err.cancelled || String(err.ddFailure.errorCode) === "-1") {
          return { status: "cancel", result: null };
        }
        throw { unsupported: "the authorization panel failed (" + describe(err.ddFailure) + ")" };
      }
      throw err;
    });
  }

  function statusDetail(answer) {
    var result = answer && answer.result;
    if (result && typeof result === "object") {
      var code = result.code || result.errorCode || result.errCode;
      if (code) {
        return " (code " + code + ")";
      }
    }
    return "";
  }

  function storageGet(key) {
    try {
      return window.localStorage ? window.localStorage.getItem(key) : null;
    } catch (ignored) {
      return null;
    }
  }

  function storageSet(key) {
    try {
      if (window.localStorage) {
        window.localStorage.setItem(key, "1");
      }
    } catch (ignored) {
      // private mode: the consent is asked again next time, nothing worse
    }
  }

  function adminConsent(dd, where, corpId, config, tools) {
    if (!config.appScopes) {
      return Promise.resolve();
    }
    var key = CONSENT_KEY + config.clientId + ":" + corpId + ":" + config.appScopes;
    if (!config.appConsent && storageGet(key)) {
      return Promise.resolve();
    }
    var params = { type: 1, clientId: config.clientId, corpId: corpId, rpcScope: config.appScopes, fieldScope: "" };
    return openAuth(dd, where, params, config, tools).then(function (answer) {
      if (answer.status === "ok") {
        storageSet(key);
        return;
      }
      if (answer.status === "toAdmin") {
        throw reason("pending", "Your request to use this app was sent to an administrator of your " +
          "organisation. Come back and sign in again once they approve it.");
      }
      if (answer.status === "cancel") {
        throw reason("denied", "The app's permissions were not granted, so you are not signed in.");
      }
      if (config.appConsent) {
        throw reason("failed", "DingTalk could not grant the app's permissions" + statusDetail(answer) + ".");
      }
      // "failed": the sign-in itself needs none of these permissions.
      if (window.console && window.console.warn) {
        window.console.warn("DingTalk app authorization failed" + statusDetail(answer) + "; signing in anyway");
      }
    }, function (err) {
      if (err && err.unsupported) {
        if (config.appConsent) {
          throw reason("failed", "This DingTalk client cannot show the authorization panel (" + err.unsupported + ").");
        }
        return; // an older client: sign in without asking
      }
      throw err;
    });
  }

  function userConsent(dd, where, corpId, config, tools) {
    var params = { type: 0, clientId: config.clientId, corpId: corpId, rpcScope: config.scopes || "",
                   fieldScope: config.fieldScopes || "" };
    return openAuth(dd, where, params, config, tools).then(function (answer) {
      var result = answer.result;
      if (answer.status === "ok") {
        if (result && typeof result.authCode === "string" && result.authCode) {
          return { code: result.authCode, context: { kind: "open_auth", corpId: corpId } };
        }
        throw fallback("the DingTalk authorization answered ok without an authCode");
      }
      if (answer.status === "toAdmin") {
        throw reason("pending", "Your authorization request was sent to an administrator of your " +
          "organisation. Come back and sign in again once they approve it.");
      }
      if (answer.status === "cancel") {
        throw reason("denied", "You declined the authorization, so you are not signed in.");
      }
      throw fallback("the DingTalk authorization failed" + statusDetail(answer));
    }, function (err) {
      if (err && err.unsupported) {
        throw fallback(err.unsupported);
      }
      throw err;
    });
  }

  window.gatewayBridges = window.gatewayBridges || {};
  window.gatewayBridges.dingtalk = {
    requestCode: function (config, tools) {
      var dd = window.dd;
      if (!dd || typeof dd !== "object") {
        return Promise.reject(fallback("no DingTalk JSAPI on this page (window.dd is missing)"));
      }
      var where = platformOf(dd);
      if (where === "notInDingTalk") {
        return Promise.reject(fallback("the page is not running inside DingTalk"));
      }
      if (where.indexOf("gdt") === 0) {
        // 政务钉钉 / 专有钉钉: another deployment, whose codes this app cannot redeem.
        return Promise.reject(fallback("this is not the public DingTalk client (" + where + ")"));
      }
      var corpId = (config.corpIdFromPage && pageCorpId()) || config.corpId;
      if (!corpId) {
        return Promise.reject(fallback("DingTalk did not say which organisation this is (no corpid in the URL)"));
      }
      var ready = Promise.resolve();
      if (typeof dd.ready === "function") {
        ready = tools.withTimeout(new Promise(function (resolve) {
          dd.ready(function () {
            resolve();
          });
        }), config.timeout_ms, "dd.ready");
      }
      return ready.then(function () {
        return adminConsent(dd, where, corpId, config, tools);
      }).then(function () {
        if (config.scopes || config.fieldScopes) {
          return userConsent(dd, where, corpId, config, tools);
        }
        return freeLoginCode(dd, corpId, config, tools);
      });
    }
  };
})();
