// /api/docs: Swagger UI from the server's own files. validatorUrl null, or the UI
// would load a badge from swagger.io: this page loads nothing from elsewhere.
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null });
});
