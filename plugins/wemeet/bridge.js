/*
 * Tencent Meeting (WeMeet) bridge: asks the client's JS-SDK for a one-time auth_code.
 *
 * The Windows client renders pages with Chrome 77, so: ES5 syntax only (plus Promise); no arrow
 * functions, let/const, template strings, async/await, optional chaining or nullish coalescing.
 *
 * The sequence (fact sheet sections 1 and 2.2):
 *   1. wemeet.permission.requestAgentAuthCode({sdkId}) -> resp.authCode (client 2.17.0+; it works
 *      only for users who have authorized the app already);
 *   2. when it is missing, rejects or answers without authCode: wemeet.permission.authorize
 *      (client 3.16.0+), the in-client authorization dialog: success({authCode}), or
 *      fail({bizCode}): 1 = the request went to an enterprise administrator (pending),
 *      2 = the user closed the dialog, 3 = the user refused, 4 = other (go on);
 *   3. else wemeet.permission.requestAuth({corpId, sdkId, redirectURI, state}), which navigates the
 *      page to the authorization page; its redirect comes back to the gateway's callback;
 *   4. else (or when nothing navigated in time) the plain authorization link: outcome "fallback".
 *
 * An incremental consent (config.consent) asks none of them: Tencent Meeting has no JSAPI that asks
 * for more scopes and the agent code would carry the same grant, so it goes to the authorization
 * page at once (outcome "fallback"), where the user authorizes the app's current scopes again.
 *
 * The rejection shapes of requestAgentAuthCode and requestAuth are undocumented, so any rejection
 * counts as "try the next way". No init/ready step is documented. A JSAPI call that does not answer
 * in time (a client bridge that never initialised) goes straight to the authorization link: the
 * other calls would hang the same way. The SDK does not work inside an iframe.
 */
(function () {
  "use strict";

  var BIZ_APPLY_SUCCEED = 1;
  var BIZ_CLOSED = 2;
  var BIZ_REJECTED = 3;

  function fallback(message) {
    return { outcome: "fallback", message: message };
  }

  // An explicit "no" from one way of asking: the next way may still work.
  function next(message) {
    return { outcome: "fallback", message: message, tryNext: true };
  }

  function describe(err) {
    if (err === undefined || err === null) {
      return "no details";
    }
    if (typeof err !== "object") {
      return String(err);
    }
    var parts = [];
    var keys = ["bizCode", "errCode", "code", "errno"];
    for (var i = 0; i < keys.length; i++) {
      if (err[keys[i]] !== undefined) {
        parts.push(keys[i] + " " + err[keys[i]]);
      }
    }
    var text = err.bizMessage || err.errMsg || err.message || err.msg;
    if (text) {
      parts.push(String(text));
    }
    return parts.length ? parts.join(", ") : "no details";
  }

  // Turns whatever a JSAPI returns into a Promise; a value that is not a thenable is undefined.
  function asPromise(value) {
    if (value && typeof value.then === "function") {
      return new Promise(function (resolve, reject) {
        value.then(resolve, reject);
      });
    }
    return Promise.resolve(undefined);
  }

  function codeFrom(resp) {
    if (resp && typeof resp.authCode === "string" && resp.authCode) {
      return { code: resp.authCode };
    }
    return null;
  }

  function agentAuthCode(permission, config, tools) {
    if (typeof permission.requestAgentAuthCode !== "function") {
      return Promise.reject(next("this client has no requestAgentAuthCode (Tencent Meeting before 2.17)"));
    }
    var call;
    try {
      call = asPromise(permission.requestAgentAuthCode({ sdkId: config.sdkId }));
    } catch (err) {
      call = Promise.reject(err);
    }
    return tools.withTimeout(call.then(function (resp) {
      var result = codeFrom(resp);
      if (!result) {
        throw next("requestAgentAuthCode answered without an authCode");
      }
      return result;
    }, function (err) {
      if (err && err.tryNext) {
        throw err;
      }
      throw next("requestAgentAuthCode failed (" + describe(err) + ")");
    }), config.timeout_ms, "wemeet.permission.requestAgentAuthCode");
  }

  function authorizeDialog(permission, config, tools) {
    if (typeof permission.authorize !== "function") {
      return Promise.reject(next("this client has no authorize dialog (Tencent Meeting before 3.16)"));
    }
    var call = new Promise(function (resolve, reject) {
      function failed(res) {
        reject({ bizFailure: res || {} });
      }
      var returned;
      try {
        // The doc's table names the failure callback "failure", its example "fail": give both.
        returned = permission.authorize({
          success: function (res) {
            resolve(res);
          },
          fail: failed,
          failure: failed
        });
      } catch (err) {
        failed({ bizMessage: "authorize threw: " + err });
      }
      asPromise(returned).then(null, function (err) {
        failed({ bizMessage: describe(err) });
      });
    });
    return tools.withTimeout(call.then(function (res) {
      var result = codeFrom(res);
      if (!result) {
        throw next("the authorize dialog answered without an authCode");
      }
      return result;
    }, function (err) {
      if (!err || !err.bizFailure) {
        throw err;
      }
      var failure = err.bizFailure;
      if (failure.bizCode === BIZ_APPLY_SUCCEED) {
        throw {
          outcome: "pending",
          message: "Your request to use this app was sent to your organisation's Tencent Meeting " +
            "administrator. Once they approve it, open the app again."
        };
      }
      if (failure.bizCode === BIZ_REJECTED) {
        throw { outcome: "denied", message: "You declined the authorization in Tencent Meeting." };
      }
      if (failure.bizCode === BIZ_CLOSED) {
        throw { outcome: "denied", message: "The Tencent Meeting authorization dialog was closed." };
      }
      throw next("the authorize dialog failed (" + describe(failure) + ")");
    }), config.timeout_ms, "wemeet.permission.authorize");
  }

  // requestAuth navigates the page away. It counts as started once the page begins to unload;
  // if nothing happens in time, the gateway's own authorization link takes over.
  function requestAuth(permission, config) {
    if (typeof permission.requestAuth !== "function") {
      return Promise.reject(fallback("this client offers no requestAuth"));
    }
    return new Promise(function (resolve, reject) {
      var done = false;
      var timer = null;
      function finish(error) {
        if (done) {
          return;
        }
        done = true;
        clearTimeout(timer);
        if (typeof window.removeEventListener === "function") {
          window.removeEventListener("beforeunload", leaving);
          window.removeEventListener("pagehide", leaving);
        }
        reject(error);
      }
      function leaving() {
        finish({ outcome: "navigating", message: "continuing on the Tencent Meeting authorization page" });
      }
      if (typeof window.addEventListener === "function") {
        window.addEventListener("beforeunload", leaving);
        window.addEventListener("pagehide", leaving);
      }
      timer = setTimeout(function () {
        finish(fallback("requestAuth did not open the authorization page in time"));
      }, config.timeout_ms);
      try {
        asPromise(permission.requestAuth({
          corpId: config.corpId,
          sdkId: config.sdkId,
          redirectURI: config.redirectUri,
          state: config.state
        })).then(null, function (err) {
          finish(fallback("requestAuth failed (" + describe(err) + ")"));
        });
      } catch (err) {
        finish(fallback("requestAuth threw (" + describe(err) + ")"));
      }
    });
  }

  // Runs step(), and on an explicit "no" the next step; keeps the reasons for the final message.
  function orElse(promise, step, reasons) {
    return promise.then(null, function (err) {
      if (!err || !err.tryNext) {
        throw err; // a code, pending, denied, navigating, or a timeout
      }
      reasons.push(err.message);
      return step();
    });
  }

  window.gatewayBridges = window.gatewayBridges || {};
  window.gatewayBridges.wemeet = {
    requestCode: function (config, tools) {
      if (window.top !== window.self) {
        return Promise.reject(fallback("the Tencent Meeting JS-SDK does not work inside an iframe"));
      }
      var wemeet = window.wemeet;
      var permission = wemeet && wemeet.permission;
      if (!permission || typeof permission !== "object") {
        return Promise.reject(fallback("no Tencent Meeting JS-SDK on this page (the wemeet global is missing)"));
      }
      if (config.consent) {
        return Promise.reject(fallback("Tencent Meeting asks for more scopes only on its authorization page"));
      }
      var reasons = [];
      var attempt = orElse(agentAuthCode(permission, config, tools), function () {
        return authorizeDialog(permission, config, tools);
      }, reasons);
      attempt = orElse(attempt, function () {
        return requestAuth(permission, config);
      }, reasons);
      return attempt.then(null, function (err) {
        if (err && err.outcome === "fallback" && reasons.length) {
          throw fallback(reasons.concat([err.message]).join("; "));
        }
        throw err;
      });
    }
  };
})();
