//! Paging through a remote listing.

use super::{Api, ErrorKind, RemoteError};

/// The one end-of-paging guard every paged listing goes through (CRM
/// customers, EDM list addresses, keyword searches, campaigns): pages are
/// read from 1 until a short page; a full page that repeats an earlier one
/// is an error (a server that ignores the page number would otherwise loop
/// for ever), and so is reading more than `max_pages` — or, for a bounded
/// search, paging just stops there.
///
/// ```text
/// let mut pages = Pager::new(Api::Edm, "ml-addr-list", "list 3", 500);
/// while let Some(page) = pages.next_page()? {
///     let batch = fetch(page).await?;
///     pages.accept(batch.len(), batch.iter().map(|a| a.id))?;
///     …
/// }
/// ```
#[derive(Debug)]
pub struct Pager {
    api: Api,
    operation: &'static str,
    /// What is paged, for error messages (`list 3`, `2026-11-30`).
    what: String,
    page_size: usize,
    max_pages: u32,
    /// Past `max_pages`: an error naming `limit_name`, or (None) a quiet end.
    limit_name: Option<&'static str>,
    page: u32,
    done: bool,
    /// Fingerprints of the full pages read so far, with their page number.
    seen: std::collections::HashMap<u64, u32>,
}

impl Pager {
    pub fn new(api: Api, operation: &'static str, what: impl Into<String>, page_size: u32) -> Self {
        Pager {
            api,
            operation,
            what: what.into(),
            page_size: page_size.max(1) as usize,
            max_pages: u32::MAX,
            limit_name: None,
            page: 0,
            done: false,
            seen: Default::default(),
        }
    }

    /// More than `max` pages is an error naming `setting`.
    pub fn fail_after(mut self, max: u32, setting: &'static str) -> Self {
        self.max_pages = max;
        self.limit_name = Some(setting);
        self
    }

    /// Paging ends quietly after `max` pages (a bounded search).
    pub fn stop_after(mut self, max: u32) -> Self {
        self.max_pages = max;
        self.limit_name = None;
        self
    }

    /// The next page number (from 1), or `None` when paging has ended.
    pub fn next_page(&mut self) -> Result<Option<u32>, RemoteError> {
        if self.done {
            return Ok(None);
        }
        if self.page >= self.max_pages {
            self.done = true;
            return match self.limit_name {
                Some(setting) => {
                    Err(self.malformed(format!("more than {} pages ({setting})", self.max_pages)))
                }
                None => Ok(None),
            };
        }
        self.page += 1;
        Ok(Some(self.page))
    }

    /// Takes in the page just read: `n` items with these `ids`. A short
    /// page ends the paging; a full page that repeats an earlier one is an
    /// error.
    pub fn accept<I: std::hash::Hash>(
        &mut self,
        n: usize,
        ids: impl IntoIterator<Item = I>,
    ) -> Result<(), RemoteError> {
        if n < self.page_size {
            self.done = true;
            return Ok(());
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for id in ids {
            std::hash::Hash::hash(&id, &mut hasher);
        }
        let fingerprint = std::hash::Hasher::finish(&hasher);
        if let Some(earlier) = self.seen.insert(fingerprint, self.page) {
            self.done = true;
            return Err(self.malformed(format!(
                "page {} repeats page {earlier} of {}; paging would not end",
                self.page, self.what
            )));
        }
        Ok(())
    }

    fn malformed(&self, detail: String) -> RemoteError {
        RemoteError::new(
            self.api,
            self.operation,
            ErrorKind::Malformed {
                detail,
                excerpt: String::new(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pager_ends_on_a_short_page_and_refuses_a_repeated_or_endless_one() {
        // A short page ends it.
        let mut p = Pager::new(Api::Edm, "ml-addr-list", "list 1", 2);
        assert_eq!(p.next_page().unwrap(), Some(1));
        p.accept(2, [1, 2]).unwrap();
        assert_eq!(p.next_page().unwrap(), Some(2));
        p.accept(1, [3]).unwrap();
        assert_eq!(p.next_page().unwrap(), None);

        // A full page that repeats an earlier one is an error naming both.
        let mut p = Pager::new(Api::Edm, "task-list", "2026-11-30", 2);
        p.next_page().unwrap();
        p.accept(2, [1, 2]).unwrap();
        p.next_page().unwrap();
        p.accept(2, [3, 4]).unwrap();
        p.next_page().unwrap();
        let err = p.accept(2, [1, 2]).unwrap_err();
        assert!(
            err.to_string()
                .contains("page 3 repeats page 1 of 2026-11-30"),
            "{err}"
        );
        assert!(err.is_retriable());

        // Past the bound: an error naming the setting, or a quiet end.
        let mut p = Pager::new(Api::Crm, "Customer/GetAllList", "customers", 1)
            .fail_after(1, "crm.max_pages");
        p.next_page().unwrap();
        p.accept(1, [1]).unwrap();
        let err = p.next_page().unwrap_err();
        assert!(
            err.to_string()
                .contains("more than 1 pages (crm.max_pages)"),
            "{err}"
        );
        let mut p = Pager::new(Api::Edm, "ml-addr-list", "search", 1).stop_after(1);
        p.next_page().unwrap();
        p.accept(1, [1]).unwrap();
        assert_eq!(p.next_page().unwrap(), None);
    }
}
