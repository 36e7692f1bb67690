"""Where the submission is built: refit, ensemble selection over trials."""
