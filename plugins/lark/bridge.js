/*
 * Lark / Feishu bridge: asks the client's JSAPI for a one-time login code.
 *
 * Runs on old in-client webviews, so: ES5 syntax only (plus Promise), no arrow functions,
 * no let/const, no async/await.
 *
 * The official sequence (fact sheet section 2):
 *   1. the JSSDK defines window.h5sdk and window.tt, inside the client only;
 *   2. wait for h5sdk.ready (login JSAPIs need no h5sdk.config);
 *   3. tt.requestAccess({appID, scopeList, state}) gives a code valid 3 minutes;
 *   4. fall back to tt.requestAuthCode({appId}) (5 minutes) ONLY when requestAccess does not
 *      exist (old JSSDK) or fails with errno 103 (client older than 6.9.0). Any other failure
 *      means the user refused or authorization failed (errno 2700002 covers both).
 *
 * Every failure rejects with outcome "fallback": the page then offers the browser OAuth login,
 * where a refusal is explicit. Every wait is bounded by tools.withTimeout, because a bridge that
 * never initialises leaves the SDK's callbacks pending forever.
 */
(function () {
  "use strict";

  var ERRNO_NOT_SUPPORTED = 103;
  var ERRNO_AUTH_FAILED = 2700002;

  // requestAuthCode errCodes that an operator can fix, and where (fact sheet 2.4).
  var ERRCODE_HINTS = {
    10200: "the App ID given to the JSAPI is wrong",
    10228: "the app is not visible to this user (check the availability scope of the released version)",
    10235: "no redirect URL is configured in the app's Security Settings",
    10236: "this page's URL is not in the app's redirect-URL list (Security Settings)"
  };

  function fallback(message) {
    return { outcome: "fallback", message: message };
  }

  // A readable account of a JSAPI fail object: errno, errCode, errString / errMsg.
  function describe(res) {
    if (!res || typeof res !== "object") {
      return String(res);
    }
    var parts = [];
    if (res.errno !== undefined) {
      parts.push("errno " + res.errno);
    }
    if (res.errCode !== undefined) {
      parts.push("errCode " + res.errCode);
    }
    if (res.errString || res.errMsg || res.message) {
      parts.push(String(res.errString || res.errMsg || res.message));
    }
    return parts.length ? parts.join(", ") : "no details";
  }

  // Call one tt.* JSAPI with success/fail callbacks, as a Promise bounded by the timeout.
  function callJsapi(fn, args, what, config, tools) {
    var call = new Promise(function (resolve, reject) {
      args.success = resolve;
      args.fail = function (res) {
        reject({ jsapiFailure: res || {} });
      };
      try {
        fn.call(window.tt, args);
      } catch (err) {
        reject({ jsapiFailure: { errMsg: what + " threw: " + err } });
      }
    });
    return tools.withTimeout(call, config.timeout_ms, what);
  }

  function codeFrom(res, what) {
    if (res && typeof res.code === "string" && res.code) {
      return { code: res.code };
    }
    throw fallback("Feishu " + what + " answered without a code");
  }

  function requestAuthCode(config, tools) {
    if (typeof window.tt.requestAuthCode !== "function") {
      return Promise.reject(fallback("this Feishu client offers neither requestAccess nor requestAuthCode"));
    }
    return callJsapi(window.tt.requestAuthCode, { appId: config.appId }, "tt.requestAuthCode", config, tools).then(
      function (res) {
        return codeFrom(res, "requestAuthCode");
      },
      function (err) {
        if (!err || !err.jsapiFailure) {
          throw err; // a timeout, already shaped by tools.withTimeout
        }
        var failure = err.jsapiFailure;
        var hint = ERRCODE_HINTS[failure.errCode];
        throw fallback("Feishu requestAuthCode failed (" + describe(failure) + ")" + (hint ? ": " + hint : ""));
      }
    );
  }

  function requestAccess(config, tools) {
    var args = { appID: config.appId, scopeList: config.scopeList || [], state: config.state };
    return callJsapi(window.tt.requestAccess, args, "tt.requestAccess", config, tools).then(
      function (res) {
        return codeFrom(res, "requestAccess");
      },
      function (err) {
        if (!err || !err.jsapiFailure) {
          throw err;
        }
        var failure = err.jsapiFailure;
        if (failure.errno === ERRNO_NOT_SUPPORTED) {
          return requestAuthCode(config, tools); // the client predates requestAccess
        }
        var why = failure.errno === ERRNO_AUTH_FAILED ? ": the user refused or authorization failed" : "";
        throw fallback("Feishu requestAccess failed (" + describe(failure) + ")" + why);
      }
    );
  }

  window.gatewayBridges = window.gatewayBridges || {};
  window.gatewayBridges.lark = {
    requestCode: function (config, tools) {
      var h5sdk = window.h5sdk;
      if (!h5sdk || !window.tt || typeof h5sdk.ready !== "function") {
        return Promise.reject(fallback("no Feishu JSAPI on this page (h5sdk/tt are missing)"));
      }
      // The official sample registers the error hook before ready; it reports a failed init.
      var failed = new Promise(function (resolve, reject) {
        if (typeof h5sdk.error === "function") {
          h5sdk.error(function (err) {
            reject(fallback("the Feishu JSSDK reported an error (" + describe(err) + ")"));
          });
        }
      });
      var ready = tools.withTimeout(
        new Promise(function (resolve) {
          h5sdk.ready(function () {
            resolve();
          });
        }),
        config.timeout_ms,
        "h5sdk.ready"
      );
      var code = Promise.race([ready, failed]).then(function () {
        if (typeof window.tt.requestAccess === "function") {
          return requestAccess(config, tools);
        }
        return requestAuthCode(config, tools); // a JSSDK too old to have requestAccess
      });
      // An SDK error during the JSAPI call also ends the wait.
      return Promise.race([code, failed]);
    }
  };
})();
